// The schemas of the kernel ops, defined once for every library that holds them: torch.ops.metaug_fast
// (csrc/cpu/score.cpp; csrc/cpu/label.cpp and csrc/cuda add kernels to it) and torch.ops.metaug_fast_simt, the
// CUDA kernels run by the SIMT emulator on the CPU (csrc/cuda/simt/oucl_cuda_simt.cpp).
#pragma once

#include <torch/library.h>

namespace metaug_fast {

inline void define_kernel_ops(torch::Library& m) {
  m.def(
      "oucl_score_fwd(Tensor pos, Tensor neg, Tensor? pos_mask, Tensor? neg_mask, int form, float beta, "
      "float gamma_pos, float gamma_neg, float margin, float lam) -> (Tensor, Tensor)");
  m.def(
      "oucl_score_bwd(Tensor grad_rows, Tensor pos, Tensor neg, Tensor? pos_mask, Tensor? neg_mask, "
      "Tensor stats, int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) "
      "-> (Tensor, Tensor)");
  m.def(
      "oucl_score_bwd_bwd(Tensor grad_rows, Tensor gg_pos, Tensor gg_neg, Tensor pos, Tensor neg, "
      "Tensor? pos_mask, Tensor? neg_mask, Tensor stats, int form, float beta, float gamma_pos, "
      "float gamma_neg, float margin, float lam) -> (Tensor, Tensor, Tensor)");
  m.def("margin_score_fwd(Tensor pos, Tensor neg, Tensor? pos_mask, Tensor? neg_mask) -> Tensor");
  m.def(
      "margin_score_bwd(Tensor grad, Tensor pos, Tensor neg, Tensor? pos_mask, Tensor? neg_mask, Tensor stats) "
      "-> (Tensor, Tensor)");
  // Label mode takes raw rows e [B,D], r [M,D] and their inverse norms iz [B], ir [M] (the similarity's rows
  // are e·iz and r·ir); the backward gives the gradients of both (oucl_host.h, LabelOps).
  m.def(
      "oucl_label_fwd(Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, Tensor ref_labels, int self_offset, "
      "int similarity, int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) "
      "-> (Tensor, Tensor)");
  m.def(
      "oucl_label_bwd(Tensor grad_rows, Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, Tensor ref_labels, "
      "Tensor stats, int self_offset, int similarity, int form, float beta, float gamma_pos, float gamma_neg, "
      "float margin, float lam, bool ref_grad=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // The second derivative (the forms with a Hessian): the backward's vector-Jacobian product for cotangents
  // v_z [B,D] on its ∂/∂zn and v_r [M,D] on its ∂/∂rn ([0,D]: none) -> (d_g [B], ∂zn [B,D], ∂rn [M,D], or
  // [0,D] without ref_grad). The Triton backend defines the same op (metaug_fast/kernels/label_hvp.py).
  m.def(
      "oucl_label_hvp(Tensor grad_rows, Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor v_z, Tensor v_r, "
      "Tensor labels, Tensor ref_labels, Tensor stats, int self_offset, int similarity, int form, float beta, "
      "float gamma_pos, float gamma_neg, float margin, float lam, bool ref_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "oucl_label_cross_fwd(Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, Tensor ref_labels, "
      "int similarity, int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "oucl_label_cross_bwd(Tensor grad_z, Tensor grad_r, Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, "
      "Tensor ref_labels, Tensor stats_z, Tensor stats_r, int similarity, int form, float beta, float gamma_pos, "
      "float gamma_neg, float margin, float lam) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace metaug_fast
