// The host layer the CPU (oucl_cpu.cpp) and CUDA (cuda/oucl_cuda.cu) ops share: the score-mode inputs'
// checks, their contiguous copies, and the packing of the loss arguments into a kernel's argument struct.
// Host code only (ATen); each file checks its own device first and names itself in the messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

#include "oucl_common.h"

namespace metaug_fast {

// Score-mode inputs as the kernels read them: contiguous, the masks undefined when absent.
struct ScoreInputs {
  at::Tensor pos, neg, pos_mask, neg_mask;
};

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shapes, dtypes, masks and the form id of a score-mode op (``who``: e.g. "oucl_score (cpp)").
inline ScoreInputs score_inputs(const std::string& who, const at::Tensor& pos, const at::Tensor& neg,
                                const c10::optional<at::Tensor>& pos_mask, const c10::optional<at::Tensor>& neg_mask,
                                int64_t form) {
  TORCH_CHECK(pos.dim() == 2 && neg.dim() == 2, who, ": pos and neg must be 2-D");
  TORCH_CHECK(pos.size(0) == neg.size(0), who, ": pos and neg must have the same number of rows");
  TORCH_CHECK(pos.scalar_type() == neg.scalar_type(), who, ": pos and neg must have the same dtype");
  TORCH_CHECK(is_form(form), who, ": unknown form id ", form);
  ScoreInputs in{pos.contiguous(), neg.contiguous(), at::Tensor(), at::Tensor()};
  if (pos_mask.has_value()) {
    TORCH_CHECK(pos_mask->scalar_type() == at::kBool && pos_mask->sizes() == pos.sizes(), who,
                ": pos_mask must be a bool tensor shaped like pos");
    in.pos_mask = pos_mask->contiguous();
  }
  if (neg_mask.has_value()) {
    TORCH_CHECK(neg_mask->scalar_type() == at::kBool && neg_mask->sizes() == neg.sizes(), who,
                ": neg_mask must be a bool tensor shaped like neg");
    in.neg_mask = neg_mask->contiguous();
  }
  return in;
}

// The loss arguments (β, γ⁺, γ⁻, m, λ) in the accumulation type, with 1/β.
template <typename T>
Cfg<T> make_cfg(double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
  return Cfg<T>{T(beta), T(1.0 / beta), T(gamma_pos), T(gamma_neg), T(margin), T(lam)};
}

// Fills the score-mode fields every kernel argument struct has (cfg, kp, kn, pos, neg, the masks).
template <typename S, typename T, typename Args>
void pack_score_args(Args& a, const ScoreInputs& in, double beta, double gamma_pos, double gamma_neg, double margin,
                     double lam) {
  a.cfg = make_cfg<T>(beta, gamma_pos, gamma_neg, margin, lam);
  a.kp = in.pos.size(1);
  a.kn = in.neg.size(1);
  a.pos = in.pos.data_ptr<S>();
  a.neg = in.neg.data_ptr<S>();
  a.pos_mask = in.pos_mask.defined() ? in.pos_mask.data_ptr<bool>() : nullptr;
  a.neg_mask = in.neg_mask.defined() ? in.neg_mask.data_ptr<bool>() : nullptr;
}

}  // namespace metaug_fast
