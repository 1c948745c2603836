// Label-mode ops on the CPU (oucl_label_fwd, oucl_label_bwd): OUCL, InfoNCE and margin statistics on
// normalized features zn [B,D] and rn [M,D] (zn itself without a reference set), both fp32 or fp64, formed
// from the ops' raw rows and inverse norms by oucl_host.h (LabelInputs), which also turns the gradients of zn
// and rn into those of the raw rows and inverse norms (Python differentiates the norms). self_offset >= 0:
// anchor i is reference row i + self_offset and that pair is excluded; -1: no exclusion.
//
// One file per schedule, over one work splitter and tile iterator (label_tiles.h): rectangular
// (label_rect.h), self (label_self.h), cross (label_cross.h) and the second derivative (label_hvp.h); this
// file picks the schedule per call and registers the ops.
//
// Work items are (range of kRowBlock-row blocks) × (range of kColTile-column tiles): each takes an ATen
// GEMM per tile into a [rows, tile] buffer and runs the fused epilogue (label_rows.inc) on it, so memory is
// O((B + M)·D) plus one tile per thread; B×M is never stored. Backward recomputes each tile and turns it
// into G = ∂ℓ/∂S in place once, and takes G·rn and (when the reference set needs a gradient) Gᵀ·zn from
// it; every output row sums in an order fixed by the shape (no atomics, thread-count independent).
//
// Self mode (the reference rows are the anchors themselves: rn is zn, self_offset 0, the same labels) uses
// that S = zn·znᵀ is symmetric: only the tiles on and above the diagonal are computed, each feeding its rows
// and, transposed, its columns; the backward forms H = G_IJ + G_JIᵀ per tile pair and takes dZ_I += H·Z_J,
// dZ_J += Hᵀ·Z_I. Half the similarity GEMMs and half the gradient GEMMs; the whole gradient is returned
// in the first output (the second is zero: callers add the two).
//
// Cross mode (oucl_label_cross_fwd/bwd, InfoNCE) takes both directions of two sets at once, each row of zn
// against rn and each row of rn against zn (CLIP's two cross-entropies): every tile of S = zn·rnᵀ is
// multiplied once and read along its rows and along its columns (label_rows.inc: the column passes run
// across the columns, no transposed copy); the backward turns each tile into H = ∂/∂S of both directions
// in one pass and takes dZ += H·R, dR += Hᵀ·Z. Four GEMM-equivalents for both directions, where two
// label-mode calls took eight.
//
// The meta step's second derivative (the Hessian of each row's loss applied to the scores' change along a
// direction) has its own ops: oucl_label_rows_bwd_bwd on row chunks of the scores that Python cuts (its round 1
// alone, oucl_label_rows_hvp_sums, for a reference set split across processes), and in
// self mode oucl_label_self_bwd_bwd over the symmetric tiles in two rounds (self_hvp, label_hvp.h).
//
// InfoNCE's positives' terms need each row's final negative log-sum-exp, so they come after the first
// sweep: by one dot product per positive pair when positives are sparse (one or a few per anchor, the
// contrastive case), else by a second sweep. metaug_fast/_ops/label.py wraps the ops in autograd Functions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "isa.h"

namespace metaug_fast {

// Per row, the sums of the cotangent that the second derivative's Hessian-vector product needs over the
// whole row before any entry of W (label_rows.inc, label_hvp_sums_tile); parts over a row's tiles add.
template <typename T>
struct HvpSums {
  T a = T(0), b = T(0), c = T(0), d = T(0);
  HvpSums& operator+=(const HvpSums& o) {
    a += o.a, b += o.b, c += o.c, d += o.d;
    return *this;
  }
};

// Per-anchor constants of the second derivative as its kernels read them: arrays indexed by anchor from a
// block's first row (or a tile's first column), so that a tile's column side reads them as vectors. The
// log-sum-exps' (shift, log_sum) of the positives and negatives (InfoNCE: the negatives only) and valid
// (1/0) for the first pass; for the second the coefficients of G and W and the row's whole sums
// (HvpLanes::second fills them). Invalid anchors hold zeros.
template <typename T>
struct Lanes {
  const T *pos_shift, *pos_log, *neg_shift, *neg_log, *valid, *coef, *c1, *sa, *sb, *s_sig;
};

#define METAUG_ROWS "label_rows.inc"
#include "compile_per_isa.inc"
#undef METAUG_ROWS

#include "label_tiles.h"
#include "label_rect.h"
#include "label_self.h"
#include "label_cross.h"
#include "label_hvp.h"

namespace {

using namespace label_cpu;

// The CPU kernels of LabelOps: each op's schedule picked by the inputs (label_rect.h, label_self.h,
// label_cross.h).
struct CpuLabel : CpuDevice {
  template <typename T>
  static void forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form, T* rows,
                      T* stats) {
    const int64_t B = zn.size(0);
    const bool self = is_self(zn, rn, a);
    auto sweep = [&](auto&& visit) { return self ? self_sweep<T>(zn, visit) : rect_sweep<T>(zn, rn, visit); };
    std::vector<RowState<T>> state = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile, RowState<T>* st) {
      label_forward_tile<T>(form, a, r0, nr, c0, L, tile, st);
    });
    if (form == kInfoNCE && sparse_positives(state, rn.size(0))) {
      positive_dots<T>(zn, rn, a, state);
    } else if (form == kInfoNCE) {
      std::vector<T> C(B);
      for (int64_t i = 0; i < B; ++i) C[i] = state[i].neg.value();
      const std::vector<RowState<T>> terms = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile,
                                                       RowState<T>* st) {
        infonce_positive_tile<T>(a, r0, nr, c0, L, tile, C.data(), st);
      });
      take_positive_terms(state, terms);
    }
    for (int64_t i = 0; i < B; ++i) finalize_row(state[i], form, a.cfg, rows[i], stats + kStats * i);
  }

  // A constant reference set with the gradient taken in the forward: dz [B, D] = ∂(Σ_i ℓ_i)/∂zn at unit
  // grad_rows, which the backward only scales. Up to kOneSweepColumns columns, in one sweep (the
  // fused-linear-cross-entropy idea): each block of rows is multiplied once, finished in memory (the
  // log-sum-exps are known before any gradient entry is needed) and turned into G and dz by one more GEMM,
  // two GEMMs where forward plus backward take three. Wider, the tiled forward and backward.
  template <typename T>
  static void forward_with_grad(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form,
                                T* rows, T* stats, at::Tensor& dz) {
    const int64_t B = zn.size(0), M = rn.size(0), block = kRowBlock;
    const std::vector<T> ones(B, T(1));
    if (M > kOneSweepColumns) {
      forward<T>(zn, rn, a, form, rows, stats);
      at::Tensor no_ref_grad = at::empty({0, zn.size(1)}, zn.options());
      backward<T>(zn, rn, a, form, stats, ones.data(), dz, no_ref_grad);
      return;
    }
    std::vector<T> C(B);
    at::parallel_for(0, (B + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * block, nr = std::min(block, B - r0);
        at::Tensor s = at::mm(zn.narrow(0, r0, nr), rn.t()).contiguous();
        at::Tensor work = s.clone();  // the forward epilogue overwrites its tile with exponents
        std::vector<RowState<T>> st(nr);
        label_forward_tile<T>(form, a, r0, nr, 0, M, work.data_ptr<T>(), st.data());
        if (form == kInfoNCE) {  // the positives' sums add to the states, whose first sweep left them 0
          for (int64_t r = 0; r < nr; ++r) C[r0 + r] = st[r].neg.value();
          infonce_positive_tile<T>(a, r0, nr, 0, M, s.data_ptr<T>(), C.data(), st.data());
        }
        for (int64_t r = 0; r < nr; ++r) finalize_row(st[r], form, a.cfg, rows[r0 + r], stats + kStats * (r0 + r));
        label_backward_tile<T>(form, a, r0, nr, 0, M, s.data_ptr<T>(), stats, ones.data());
        at::Tensor out = dz.narrow(0, r0, nr);
        at::mm_out(out, s, rn);
      }
    });
  }

  template <typename T>
  static void backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form,
                       const T* stats, const T* grad_rows, at::Tensor& gz, at::Tensor& gr) {
    if (is_self(zn, rn, a)) return self_backward<T>(zn, a, form, stats, grad_rows, gz);
    rect_backward<T>(zn, rn, a, form, stats, grad_rows, gz, gr);
  }

  template <typename T, typename... Args>
  static void cross_forward(Args&&... args) {
    label_cpu::cross_forward<T>(std::forward<Args>(args)...);
  }

  template <typename T, typename... Args>
  static void cross_backward(Args&&... args) {
    label_cpu::cross_backward<T>(std::forward<Args>(args)...);
  }
};

}  // namespace

// torch.ops.metaug_fast.oucl_label_fwd_grad: oucl_label_fwd's (rows, stats) and, for a constant reference
// set, (∂e [B, D], ∂iz [B]) of Σ_i ℓ_i, so that the backward is those scaled by grad_rows
// (CpuLabel::forward_with_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_fwd_grad(
    const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir, const at::Tensor& labels,
    const at::Tensor& ref_labels, int64_t self_offset, int64_t similarity, int64_t form, double beta,
    double gamma_pos, double gamma_neg, double margin, double lam) {
  const LabelInputs<CpuLabel> in(e, iz, r, ir, labels, ref_labels, form, similarity);
  TORCH_CHECK(form != kMargin, "oucl_label_fwd_grad: margin statistics have two outputs per row, not one loss");
  const int64_t B = in.zn.size(0);
  at::Tensor rows = at::empty({B}, in.zn.options()), stats = at::empty({B, kStats}, in.zn.options());
  at::Tensor dz = at::zeros_like(in.zn);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_fwd_grad", [&] {
      const auto a = LabelOps<CpuLabel>::args<scalar_t>(in, self_offset, similarity, beta, gamma_pos, gamma_neg,
                                                        margin, lam);
      CpuLabel::forward_with_grad<scalar_t>(in.zn, in.rn, a, form, rows.data_ptr<scalar_t>(),
                                            stats.data_ptr<scalar_t>(), dz);
    });
  }
  const auto d_e = raw_grads(dz, e, iz);
  return {rows, stats, std::get<0>(d_e), std::get<1>(d_e)};
}

// torch.ops.metaug_fast.oucl_label_self_bwd_bwd: the second derivative of self mode (no reference set: the
// reference rows are zn itself, each anchor's own pair excluded), for the LSE forms and InfoNCE. With
// oucl_label_bwd's gradient a·(G + Gᵀ)·zn and its cotangent v [N,D]: (d_g [N], d_z [N,D]) = the gradients of
// ⟨v, a·(G + Gᵀ)·zn⟩ with respect to grad_rows [N] and zn [N,D], over the tiles on and above the diagonal
// (self_hvp, label_hvp.h); every sum in an order fixed by the shape.
std::tuple<at::Tensor, at::Tensor> label_self_bwd_bwd(const at::Tensor& grad_rows, const at::Tensor& zn,
                                                      const at::Tensor& v, const at::Tensor& labels,
                                                      const at::Tensor& stats, int64_t similarity, int64_t form,
                                                      double beta, double gamma_pos, double gamma_neg, double margin,
                                                      double lam) {
  const char* who = "oucl_label_self_bwd_bwd";
  const LabelInputs<CpuLabel> in(zn, zn, labels, labels, form, similarity);
  TORCH_CHECK(is_hvp_form(form), who, ": form must be squared, weighted, circle or InfoNCE, got ", form);
  TORCH_CHECK(v.sizes() == in.zn.sizes() && v.scalar_type() == in.zn.scalar_type() && v.device().is_cpu(), who,
              ": v must be a CPU tensor of zn's shape and dtype");
  const auto checked = label_backward_inputs<CpuLabel>(stats, grad_rows, in.zn, form);
  const int64_t N = in.zn.size(0);
  at::Tensor d_g = at::zeros({N}, in.zn.options()), d_z = at::zeros_like(in.zn);
  if (N == 0) return {d_g, d_z};
  const at::Tensor vc = v.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_self_bwd_bwd", [&] {
    const auto a = make_label_args<scalar_t>(in.labels, in.labels, 0, similarity, beta, gamma_pos, gamma_neg, margin,
                                             lam);
    self_hvp<scalar_t>(in.zn, vc, a, form, std::get<0>(checked).data_ptr<scalar_t>(),
                       std::get<1>(checked).data_ptr<scalar_t>(), d_g.data_ptr<scalar_t>(), d_z);
  });
  return {d_g, d_z};
}

TORCH_LIBRARY_FRAGMENT(metaug_fast, m) {
  m.def("oucl_label_rows_bwd_bwd(Tensor grad_rows, Tensor t, Tensor s, Tensor labels, Tensor ref_labels, "
        "Tensor stats, int row0, int self_offset, int form, float beta, float gamma_pos, float gamma_neg, "
        "float margin, float lam, Tensor? sums=None) -> (Tensor, Tensor, Tensor)");
  m.def("oucl_label_rows_hvp_sums(Tensor t, Tensor s, Tensor labels, Tensor ref_labels, Tensor stats, int row0, "
        "int self_offset, int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) "
        "-> (Tensor, Tensor)");
  m.def("oucl_label_self_bwd_bwd(Tensor grad_rows, Tensor zn, Tensor v, Tensor labels, Tensor stats, int similarity, "
        "int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) -> (Tensor, Tensor)");
  m.def("oucl_label_fwd_grad(Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, Tensor ref_labels, "
        "int self_offset, int similarity, int form, float beta, float gamma_pos, float gamma_neg, float margin, "
        "float lam) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) {
  LabelOps<CpuLabel>::impl(m);
  m.impl("oucl_label_rows_bwd_bwd", &label_rows_bwd_bwd);
  m.impl("oucl_label_rows_hvp_sums", &label_rows_hvp_sums);
  m.impl("oucl_label_self_bwd_bwd", &label_self_bwd_bwd);
  m.impl("oucl_label_fwd_grad", &label_fwd_grad);
  CrossOps<CpuLabel>::impl(m);
}

}  // namespace metaug_fast
