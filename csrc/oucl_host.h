// The host layer the CPU (cpu/) and CUDA (cuda/) ops share: the inputs' checks, their contiguous copies,
// the packing of the loss arguments into a kernel's argument struct, and the score-mode op bodies, written
// once over a backend (see ScoreOps). Host code only (ATen).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>

#include "oucl_common.h"

namespace metaug_fast {

// The CPU as the backend of the op bodies below (cuda/device.h gives the CUDA one).
struct CpuDevice {
  static constexpr const char* kName = "cpp";
  static constexpr const char* kDevice = "CPU";
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static bool check_device(const at::Tensor& t) { return t.device().is_cpu(); }
};

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

// The score-mode argument struct with its inputs and loss arguments filled in.
template <typename S, typename T>
ScoreArgs<S, T> make_score_args(const ScoreInputs& in, double beta, double gamma_pos, double gamma_neg,
                                double margin, double lam) {
  ScoreArgs<S, T> a;
  a.cfg = make_cfg<T>(beta, gamma_pos, gamma_neg, margin, lam);
  a.B = in.pos.size(0);
  a.kp = in.pos.size(1);
  a.kn = in.neg.size(1);
  a.pos = in.pos.data_ptr<S>();
  a.neg = in.neg.data_ptr<S>();
  a.pos_mask = in.pos_mask.defined() ? in.pos_mask.data_ptr<bool>() : nullptr;
  a.neg_mask = in.neg_mask.defined() ? in.neg_mask.data_ptr<bool>() : nullptr;
  return a;
}

// The score-mode ops (torch.ops.metaug_fast.oucl_score_* and margin_score_*) over a backend, which gives:
//   kName                        "cpp" or "cuda", for the messages;
//   check_device(t)              whether a tensor is on the backend's device;
//   Guard                        constructed from a device, held for the op (the CUDA device guard);
//   run<S, T>(pass, form, args)  the kernels of one pass.
// The checks, the output allocation and the argument packing are written here, once.
template <typename Backend>
struct ScoreOps {
  using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
  using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using OptTensor = c10::optional<at::Tensor>;

  static std::string who() { return std::string("oucl_score (") + Backend::kName + ")"; }

  static ScoreInputs inputs(const at::Tensor& pos, const at::Tensor& neg, const OptTensor& pos_mask,
                            const OptTensor& neg_mask, int64_t form) {
    TORCH_CHECK(Backend::check_device(pos) && pos.device() == neg.device(), who(),
                ": pos and neg must be tensors on one ", Backend::kDevice, " device");
    return score_inputs(who(), pos, neg, pos_mask, neg_mask, form);
  }

  static at::TensorOptions acc_options(const at::Tensor& pos) {
    return pos.options().dtype(acc_type(pos.scalar_type()));
  }

  static void check_stats(const at::Tensor& stats, const at::Tensor& pos) {
    TORCH_CHECK(stats.scalar_type() == acc_type(pos.scalar_type()) && stats.dim() == 2 &&
                    stats.size(0) == pos.size(0) && stats.size(1) == kStats && stats.is_contiguous() &&
                    stats.device() == pos.device(),
                who(), ": stats must be the [B,", kStats, "] tensor returned by the forward");
  }

  // grad_rows: [B] ([B,2]: σ⁺, σ⁻ for margins) in the accumulation dtype of pos.
  static at::Tensor grad_rows(const at::Tensor& g, const at::Tensor& pos, int64_t cols) {
    const bool shaped = cols == 1 ? g.dim() == 1 : g.dim() == 2 && g.size(1) == cols;
    TORCH_CHECK(shaped && g.size(0) == pos.size(0) && g.scalar_type() == acc_type(pos.scalar_type()) &&
                    g.device() == pos.device(),
                who(), ": grad_rows must be [B", cols == 1 ? "" : ",2", "] in the accumulation dtype of pos");
    return g.contiguous();
  }

  static at::Tensor like(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes() && t.device() == like.device(),
                who(), ": ", name, " must match ", like.sizes(), " ", like.scalar_type());
    return t.contiguous();
  }

  // Packs the arguments for the input dtype and runs `fill(args)` then the pass's kernels.
  template <typename Fill>
  static void dispatch(Pass pass, int64_t form, const ScoreInputs& in, double beta, double gamma_pos,
                       double gamma_neg, double margin, double lam, Fill&& fill) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.pos.scalar_type(), "oucl_score", [&] {
      using T = at::opmath_type<scalar_t>;
      auto a = make_score_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
      fill(a);
      if (a.B > 0) Backend::template run<scalar_t, T>(pass, form, a);
    });
  }

  // -> (rows [B], stats [B,kStats]), both in the accumulation dtype.
  static Tensors2 fwd(const at::Tensor& pos, const at::Tensor& neg, const OptTensor& pos_mask,
                      const OptTensor& neg_mask, int64_t form, double beta, double gamma_pos, double gamma_neg,
                      double margin, double lam) {
    const ScoreInputs in = inputs(pos, neg, pos_mask, neg_mask, form);
    const typename Backend::Guard guard(pos.device());
    at::Tensor rows = at::empty({pos.size(0)}, acc_options(pos)), stats = at::empty({pos.size(0), kStats}, acc_options(pos));
    dispatch(Pass::kForward, form, in, beta, gamma_pos, gamma_neg, margin, lam, [&](auto& a) {
      using T = std::remove_pointer_t<decltype(a.rows)>;
      a.rows = rows.data_ptr<T>();
      a.stats = stats.data_ptr<T>();
    });
    return {rows, stats};
  }

  // The backward pass of `form` with grad_rows g [B] ([B,2] for margins) -> (grad_pos [B,K⁺], grad_neg [B,K⁻])
  // in the input dtype.
  static Tensors2 backward(const ScoreInputs& in, const at::Tensor& g, const at::Tensor& stats, int64_t form,
                           double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
    at::Tensor gp = at::empty_like(in.pos), gn = at::empty_like(in.neg);
    dispatch(Pass::kBackward, form, in, beta, gamma_pos, gamma_neg, margin, lam, [&](auto& a) {
      using T = std::remove_pointer_t<decltype(a.rows)>;
      using S = std::remove_const_t<std::remove_pointer_t<decltype(a.pos)>>;
      a.grad_rows = g.data_ptr<T>();
      a.stats = const_cast<T*>(stats.data_ptr<T>());
      a.out_pos = gp.data_ptr<S>();
      a.out_neg = gn.data_ptr<S>();
    });
    return {gp, gn};
  }

  static Tensors2 bwd(const at::Tensor& grad_rows_in, const at::Tensor& pos, const at::Tensor& neg,
                      const OptTensor& pos_mask, const OptTensor& neg_mask, const at::Tensor& stats, int64_t form,
                      double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
    const ScoreInputs in = inputs(pos, neg, pos_mask, neg_mask, form);
    const typename Backend::Guard guard(pos.device());
    check_stats(stats, pos);
    return backward(in, grad_rows(grad_rows_in, pos, 1), stats, form, beta, gamma_pos, gamma_neg, margin, lam);
  }

  // -> (grad_grad_rows [B], hv_pos [B,K⁺], hv_neg [B,K⁻]).
  static Tensors3 bwd_bwd(const at::Tensor& grad_rows_in, const at::Tensor& gg_pos, const at::Tensor& gg_neg,
                          const at::Tensor& pos, const at::Tensor& neg, const OptTensor& pos_mask,
                          const OptTensor& neg_mask, const at::Tensor& stats, int64_t form, double beta,
                          double gamma_pos, double gamma_neg, double margin, double lam) {
    const ScoreInputs in = inputs(pos, neg, pos_mask, neg_mask, form);
    const typename Backend::Guard guard(pos.device());
    check_stats(stats, pos);
    const at::Tensor g = grad_rows(grad_rows_in, pos, 1);
    const at::Tensor tp = like(gg_pos, pos, "gg_pos"), tn = like(gg_neg, neg, "gg_neg");
    at::Tensor ggo = at::empty_like(g), hp = at::empty_like(in.pos), hn = at::empty_like(in.neg);
    dispatch(Pass::kDoubleBackward, form, in, beta, gamma_pos, gamma_neg, margin, lam, [&](auto& a) {
               using T = std::remove_pointer_t<decltype(a.rows)>;
               using S = std::remove_const_t<std::remove_pointer_t<decltype(a.pos)>>;
               a.grad_rows = g.data_ptr<T>();
               a.gg_pos = tp.data_ptr<S>();
               a.gg_neg = tn.data_ptr<S>();
               a.stats = const_cast<T*>(stats.data_ptr<T>());
               a.grad_grad_rows = ggo.data_ptr<T>();
               a.out_pos = hp.data_ptr<S>();
               a.out_neg = hn.data_ptr<S>();
             });
    return {ggo, hp, hn};
  }

  // Margin statistics: stats [B,kStats] = (p_min, n_max, ties_p, ties_n, valid) in the accumulation dtype.
  static at::Tensor margin_fwd(const at::Tensor& pos, const at::Tensor& neg, const OptTensor& pos_mask,
                               const OptTensor& neg_mask) {
    return std::get<1>(fwd(pos, neg, pos_mask, neg_mask, kMargin, 1.0, 0.0, 0.0, 0.0, 0.0));
  }

  // grad [B,2] = (∂/∂p_min, ∂/∂n_max), shared among the ties -> (grad_pos, grad_neg).
  static Tensors2 margin_bwd(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& neg,
                             const OptTensor& pos_mask, const OptTensor& neg_mask, const at::Tensor& stats) {
    const ScoreInputs in = inputs(pos, neg, pos_mask, neg_mask, kMargin);
    const typename Backend::Guard guard(pos.device());
    check_stats(stats, pos);
    return backward(in, grad_rows(grad, pos, 2), stats, kMargin, 1.0, 0.0, 0.0, 0.0, 0.0);
  }

  // Registers the ops' kernels for the backend's dispatch key (the library fragment says which).
  static void impl(torch::Library& m) {
    m.impl("oucl_score_fwd", &fwd);
    m.impl("oucl_score_bwd", &bwd);
    m.impl("oucl_score_bwd_bwd", &bwd_bwd);
    m.impl("margin_score_fwd", &margin_fwd);
    m.impl("margin_score_bwd", &margin_bwd);
  }
};

// Label-mode rows as the backends' kernels take them: zn [B,D], rn [M,D] normalized, fp32 or fp64; labels
// [B], ref_labels [M] int64; all on one device, which the backend's check_device accepts.
template <typename Backend>
void check_label_inputs(const at::Tensor& zn, const at::Tensor& rn, const at::Tensor& labels,
                        const at::Tensor& ref_labels, int64_t form, int64_t similarity) {
  const std::string who = std::string("oucl_label (") + Backend::kName + ")";
  TORCH_CHECK(Backend::check_device(zn) && rn.device() == zn.device() && labels.device() == zn.device() &&
                  ref_labels.device() == zn.device(),
              who, ": all tensors on one ", Backend::kDevice, " device");
  TORCH_CHECK(zn.dim() == 2 && rn.dim() == 2 && zn.size(1) == rn.size(1), who, ": zn [B,D], rn [M,D]");
  TORCH_CHECK(zn.scalar_type() == rn.scalar_type() &&
                  (zn.scalar_type() == at::kFloat || zn.scalar_type() == at::kDouble),
              who, ": zn and rn must both be float32 or both float64");
  TORCH_CHECK(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong &&
                  labels.numel() == zn.size(0) && ref_labels.numel() == rn.size(0),
              who, ": labels [B] and ref_labels [M] must be int64");
  TORCH_CHECK(is_form(form), who, ": unknown form id ", form);
  TORCH_CHECK(similarity == kShiftedCosine || similarity == kCosine, who, ": unknown similarity id ", similarity);
}

// The label ops' interface, shared with the Triton backend: raw rows e [B,D], r [M,D] in any floating dtype
// and their inverse norms iz [B], ir [M] in the accumulation dtype (fp32, or fp64 for fp64 rows): the rows the
// similarity takes are e·iz and r·ir.
template <typename Backend>
void check_raw_rows(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir) {
  const std::string who = std::string("oucl_label (") + Backend::kName + ")";
  TORCH_CHECK(e.dim() == 2 && r.dim() == 2 && e.size(1) == r.size(1) && iz.dim() == 1 && ir.dim() == 1 &&
                  iz.size(0) == e.size(0) && ir.size(0) == r.size(0),
              who, ": rows e [B,D], r [M,D] and inverse norms iz [B], ir [M]");
  TORCH_CHECK(at::isFloatingType(e.scalar_type()) && at::isFloatingType(r.scalar_type()) &&
                  iz.scalar_type() == ir.scalar_type() &&
                  iz.scalar_type() == (e.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              who, ": e and r floating point, iz and ir in their accumulation dtype (float64 for float64 rows, "
              "float32 otherwise)");
}

// zn = e·iz in the accumulation dtype, contiguous: the rows the kernels take.
inline at::Tensor scaled_rows(const at::Tensor& e, const at::Tensor& inv) {
  return (e.detach().to(inv.scalar_type()) * inv.detach().unsqueeze(1)).contiguous();
}

// Whether two tensors are one view of the same data (the same storage, offset, shape and strides).
inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

// The label ops' common prologue, alive for the op's whole body: inputs checked, the device guard, autograd
// off for the internal GEMMs (it would keep every tile alive), and detached contiguous inputs (detached:
// gradient buffers allocated with zn.options() would otherwise carry requires_grad). From raw rows and inverse
// norms the normalized rows are formed once (O((B + M)·D), against the B·M·D of the tiles); the same e and iz
// as r and ir give one tensor for both, which is how self mode is recognized (is_self).
template <typename Backend>
struct LabelInputs {
  LabelInputs(const at::Tensor& zn_in, const at::Tensor& rn_in, const at::Tensor& labels_in,
              const at::Tensor& ref_labels_in, int64_t form, int64_t similarity)
      : guard((check_label_inputs<Backend>(zn_in, rn_in, labels_in, ref_labels_in, form, similarity), zn_in.device())),
        zn(zn_in.detach().contiguous()),
        rn(rn_in.detach().contiguous()),
        labels(labels_in.contiguous()),
        ref_labels(ref_labels_in.contiguous()) {}
  LabelInputs(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir,
              const at::Tensor& labels_in, const at::Tensor& ref_labels_in, int64_t form, int64_t similarity)
      : guard((check_raw_rows<Backend>(e, iz, r, ir), e.device())),
        zn(scaled_rows(e, iz)),
        rn(same_rows(e, iz, r, ir) ? zn : scaled_rows(r, ir)),
        labels(labels_in.contiguous()),
        ref_labels(ref_labels_in.contiguous()) {
    check_label_inputs<Backend>(zn, rn, labels, ref_labels, form, similarity);
  }
  static bool same_rows(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir) {
    return same_view(e, r) && iz.data_ptr() == ir.data_ptr() && iz.sizes() == ir.sizes();
  }
  const typename Backend::Guard guard;
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor zn, rn, labels, ref_labels;
};

// (∂/∂x at fixed inverse norms [n,D], ∂/∂inv [n]) from ∂/∂(x·inv) [n,D], in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor> raw_grads(const at::Tensor& g, const at::Tensor& x, const at::Tensor& inv) {
  return {g * inv.detach().unsqueeze(1), (g * x.detach().to(g.scalar_type())).sum(1)};
}

// The label backward's saved stats [B,kStats] and incoming grad_rows [B] ([B,2] for margins), contiguous.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> label_backward_inputs(const at::Tensor& stats, const at::Tensor& grad_rows,
                                                         const at::Tensor& zn, int64_t form) {
  const std::string who = std::string("oucl_label (") + Backend::kName + ")";
  const int64_t B = zn.size(0);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({B, kStats}) && stats.scalar_type() == zn.scalar_type() &&
                  stats.device() == zn.device(),
              who, ": stats must be the [B,", kStats, "] tensor returned by oucl_label_fwd");
  TORCH_CHECK(grad_rows.size(0) == B && grad_rows.scalar_type() == zn.scalar_type() &&
                  grad_rows.device() == zn.device() &&
                  (form == kMargin ? grad_rows.dim() == 2 && grad_rows.size(1) == 2 : grad_rows.dim() == 1),
              who, ": grad_rows must be [B] ([B,2]: σ⁺, σ⁻ for margins) in the dtype of zn");
  return {stats.contiguous(), grad_rows.contiguous()};
}

template <typename T>
LabelArgs<T> make_label_args(const at::Tensor& labels, const at::Tensor& ref_labels, int64_t self_offset,
                             int64_t similarity, double beta, double gamma_pos, double gamma_neg, double margin,
                             double lam) {
  LabelArgs<T> a;
  a.cfg = make_cfg<T>(beta, gamma_pos, gamma_neg, margin, lam);
  a.sim_a = similarity == kShiftedCosine ? T(0.5) : T(1);
  a.sim_b = similarity == kShiftedCosine ? T(0.5) : T(0);
  a.exclude_self = self_offset >= 0;
  a.self_offset = self_offset;
  a.labels = labels.data_ptr<int64_t>();
  a.ref_labels = ref_labels.data_ptr<int64_t>();
  return a;
}

// Self mode: the reference rows are the anchors themselves (rn is zn, the same labels, self_offset 0), so
// S = zn·znᵀ is symmetric and a backend may compute only the tiles on and above the diagonal.
template <typename T>
bool is_self(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a) {
  return zn.data_ptr() == rn.data_ptr() && zn.sizes() == rn.sizes() && a.labels == a.ref_labels &&
         a.exclude_self && a.self_offset == 0;
}

// The label-mode ops (torch.ops.metaug_fast.oucl_label_fwd, oucl_label_bwd) over a backend, which gives,
// besides kName, kDevice, Guard and check_device (as for ScoreOps):
//   forward<T>(zn, rn, args, form, rows, stats)   rows [B] and stats [B,kStats] of every row (B > 0);
//   backward<T>(zn, rn, args, form, stats, grad_rows, gz, gr)   accumulates ∂/∂zn into gz [B,D] and, when gr
//                                                 is not empty, ∂/∂rn into gr [M,D] (B > 0, M > 0);
// zn, rn as LabelInputs makes them from the raw rows: normalized, detached, contiguous.
template <typename Backend>
struct LabelOps {
  using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
  using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

  template <typename T>
  static LabelArgs<T> args(const LabelInputs<Backend>& in, int64_t self_offset, int64_t similarity, double beta,
                           double gamma_pos, double gamma_neg, double margin, double lam) {
    return make_label_args<T>(in.labels, in.ref_labels, self_offset, similarity, beta, gamma_pos, gamma_neg, margin,
                              lam);
  }

  // -> (rows [B], stats [B,kStats]) in the accumulation dtype.
  static Tensors2 fwd(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir,
                      const at::Tensor& labels, const at::Tensor& ref_labels, int64_t self_offset, int64_t similarity,
                      int64_t form, double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
    const LabelInputs<Backend> in(e, iz, r, ir, labels, ref_labels, form, similarity);
    const int64_t B = in.zn.size(0);
    at::Tensor rows = at::empty({B}, in.zn.options()), stats = at::empty({B, kStats}, in.zn.options());
    if (B == 0) return {rows, stats};
    AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_fwd", [&] {
      const auto a = args<scalar_t>(in, self_offset, similarity, beta, gamma_pos, gamma_neg, margin, lam);
      Backend::template forward<scalar_t>(in.zn, in.rn, a, form, rows.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
    });
    return {rows, stats};
  }

  // -> (∂e [B,D] at fixed inverse norms, ∂iz [B], ∂r [M,D], ∂ir [M]) in the accumulation dtype. Self mode
  // (the same rows and inverse norms as both sets, self_offset 0): the whole gradient is in (∂e, ∂iz) and the
  // reference's parts are empty ([0,D], [0]); so they are with ref_grad = false (a constant reference set such
  // as a memory bank), whose GEMMs are then skipped.
  static Tensors4 bwd(const at::Tensor& grad_rows, const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r,
                      const at::Tensor& ir, const at::Tensor& labels, const at::Tensor& ref_labels,
                      const at::Tensor& stats, int64_t self_offset, int64_t similarity, int64_t form, double beta,
                      double gamma_pos, double gamma_neg, double margin, double lam, bool ref_grad) {
    const LabelInputs<Backend> in(e, iz, r, ir, labels, ref_labels, form, similarity);
    const auto checked = label_backward_inputs<Backend>(stats, grad_rows, in.zn, form);
    const at::Tensor &st = std::get<0>(checked), &g = std::get<1>(checked);
    const int64_t B = in.zn.size(0), M = in.rn.size(0), D = in.zn.size(1);
    const bool self = in.zn.data_ptr() == in.rn.data_ptr() && self_offset == 0;
    const bool reference_parts = ref_grad && !self;
    at::Tensor gz = at::zeros_like(in.zn), gr = at::zeros({ref_grad ? M : 0, D}, in.zn.options());
    if (B > 0 && M > 0) {
      AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_bwd", [&] {
        const auto a = args<scalar_t>(in, self_offset, similarity, beta, gamma_pos, gamma_neg, margin, lam);
        Backend::template backward<scalar_t>(in.zn, in.rn, a, form, st.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gz,
                                             gr);
      });
    }
    if (self && ref_grad) gz.add_(gr);  // both sets are e: its gradient is the sum of both parts
    const auto d_e = raw_grads(gz, e, iz);
    if (!reference_parts)
      return {std::get<0>(d_e), std::get<1>(d_e), at::zeros({0, D}, gz.options()), at::zeros({0}, gz.options())};
    const auto d_r = raw_grads(gr, r, ir);
    return {std::get<0>(d_e), std::get<1>(d_e), std::get<0>(d_r), std::get<1>(d_r)};
  }

  // -> (d_g [B], ∂zn [B,D], ∂rn [M,D], or [0,D] without ref_grad) in the accumulation dtype: the second
  // derivative of the label ops (the forms with a Hessian), for the cotangents v_z [B,D] on the backward's
  // ∂/∂zn and v_r [M,D] on its ∂/∂rn ([0,D]: none), as the Triton op of the same name defines it
  // (metaug_fast/kernels/label_hvp.py). In self mode with v_r the very tensor v_z (the backward's two halves
  // summed) the backend may take the symmetric tiles and return the whole ∂ in ∂zn, ∂rn zero. The backend
  // gives hvp<T>(zn, rn, v_z, v_r, self, args, form, stats, grad_rows, d_g, dz, dr) (B > 0, M > 0), only
  // the backends that register impl_hvp.
  static Tensors3 hvp(const at::Tensor& grad_rows, const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r,
                      const at::Tensor& ir, const at::Tensor& v_z, const at::Tensor& v_r, const at::Tensor& labels,
                      const at::Tensor& ref_labels, const at::Tensor& stats, int64_t self_offset, int64_t similarity,
                      int64_t form, double beta, double gamma_pos, double gamma_neg, double margin, double lam,
                      bool ref_grad) {
    const std::string who = std::string("oucl_label_hvp (") + Backend::kName + ")";
    TORCH_CHECK_VALUE(is_hvp_form(form), who, ": form ", form, " has no fused second derivative; forms: squared (",
                      int64_t(kSquared), "), weighted (", int64_t(kWeighted), "), circle (", int64_t(kCircle),
                      "), InfoNCE (", int64_t(kInfoNCE), ")");
    const LabelInputs<Backend> in(e, iz, r, ir, labels, ref_labels, form, similarity);
    const auto checked = label_backward_inputs<Backend>(stats, grad_rows, in.zn, form);
    const int64_t B = in.zn.size(0), M = in.rn.size(0), D = in.zn.size(1);
    TORCH_CHECK(v_z.dim() == 2 && v_z.size(0) == B && v_z.size(1) == D && v_r.dim() == 2 &&
                    (v_r.size(0) == M || v_r.size(0) == 0) && v_r.size(1) == D &&
                    at::isFloatingType(v_z.scalar_type()) && at::isFloatingType(v_r.scalar_type()) &&
                    v_z.device() == in.zn.device() && v_r.device() == in.zn.device(),
                who, ": cotangents v_z [B,D] and v_r [M,D] or [0,D], floating point, on the rows' device");
    // Decided on the tensors as given: converting them may copy one but not the other.
    const bool same_v = same_view(v_z, v_r);
    const at::Tensor vz = v_z.detach().to(in.zn.scalar_type()).contiguous();
    const at::Tensor vr = same_v ? vz : v_r.detach().to(in.zn.scalar_type()).contiguous();
    at::Tensor d_g = at::zeros({B}, in.zn.options()), dz = at::zeros_like(in.zn);
    at::Tensor dr = at::zeros({ref_grad ? M : 0, D}, in.zn.options());
    if (B == 0 || M == 0 || D == 0) return {d_g, dz, dr};
    AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_hvp", [&] {
      const auto a = args<scalar_t>(in, self_offset, similarity, beta, gamma_pos, gamma_neg, margin, lam);
      const bool self = same_v && is_self(in.zn, in.rn, a);
      Backend::template hvp<scalar_t>(in.zn, in.rn, vz, vr, self, a, form, std::get<0>(checked).template data_ptr<scalar_t>(),
                                      std::get<1>(checked).template data_ptr<scalar_t>(), d_g.data_ptr<scalar_t>(), dz, dr);
    });
    return {d_g, dz, dr};
  }

  static void impl(torch::Library& m) {
    m.impl("oucl_label_fwd", &fwd);
    m.impl("oucl_label_bwd", &bwd);
  }

  static void impl_hvp(torch::Library& m) { m.impl("oucl_label_hvp", &hvp); }
};

// Cross mode (torch.ops.metaug_fast.oucl_label_cross_fwd, oucl_label_cross_bwd; InfoNCE): each row of zn
// against the rows of rn and each row of rn against the rows of zn, no pair excluded, over a backend that
// gives
//   cross_forward<T>(zn, rn, a, a_t, rows_z, stats_z, rows_r, stats_r)
//   cross_backward<T>(zn, rn, a, a_t, stats_z, grad_z, stats_r, grad_r, gz, gr)   (B > 0, M > 0)
// with a the label arguments of zn's rows and a_t those of rn's (the labels swapped).
template <typename Backend>
struct CrossOps {
  using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

  struct Inputs : LabelInputs<Backend> {
    Inputs(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir,
           const at::Tensor& labels, const at::Tensor& ref_labels, int64_t similarity, int64_t form)
        : LabelInputs<Backend>(e, iz, r, ir, labels, ref_labels, form, similarity) {
      TORCH_CHECK(form == kInfoNCE, "oucl_label_cross (", Backend::kName, "): cross mode runs InfoNCE (form ",
                  int64_t(kInfoNCE), "), got form ", form);
    }
    template <typename T>
    std::pair<LabelArgs<T>, LabelArgs<T>> args(int64_t similarity, double beta) const {
      return {make_label_args<T>(this->labels, this->ref_labels, -1, similarity, beta, 0, 0, 0, 0),
              make_label_args<T>(this->ref_labels, this->labels, -1, similarity, beta, 0, 0, 0, 0)};
    }
  };

  // -> (rows_z [B], stats_z [B,kStats], rows_r [M], stats_r [M,kStats]) in the accumulation dtype.
  static Tensors4 fwd(const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir,
                      const at::Tensor& labels, const at::Tensor& ref_labels, int64_t similarity, int64_t form,
                      double beta, double, double, double, double) {
    const Inputs in(e, iz, r, ir, labels, ref_labels, similarity, form);
    const int64_t B = in.zn.size(0), M = in.rn.size(0);
    at::Tensor rows_z = at::empty({B}, in.zn.options()), stats_z = at::empty({B, kStats}, in.zn.options());
    at::Tensor rows_r = at::empty({M}, in.zn.options()), stats_r = at::empty({M, kStats}, in.zn.options());
    AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_cross_fwd", [&] {
      const auto a = in.template args<scalar_t>(similarity, beta);
      Backend::template cross_forward<scalar_t>(in.zn, in.rn, a.first, a.second, rows_z.data_ptr<scalar_t>(),
                                                stats_z.data_ptr<scalar_t>(), rows_r.data_ptr<scalar_t>(),
                                                stats_r.data_ptr<scalar_t>());
    });
    return {rows_z, stats_z, rows_r, stats_r};
  }

  // -> (∂e [B,D], ∂iz [B], ∂r [M,D], ∂ir [M]) of Σ_i grad_z[i]·ℓ_i + Σ_j grad_r[j]·ℓ'_j, as LabelOps::bwd.
  static Tensors4 bwd(const at::Tensor& grad_z, const at::Tensor& grad_r, const at::Tensor& e, const at::Tensor& iz,
                      const at::Tensor& r, const at::Tensor& ir, const at::Tensor& labels,
                      const at::Tensor& ref_labels, const at::Tensor& stats_z, const at::Tensor& stats_r,
                      int64_t similarity, int64_t form, double beta, double, double, double, double) {
    const Inputs in(e, iz, r, ir, labels, ref_labels, similarity, form);
    const auto z_side = label_backward_inputs<Backend>(stats_z, grad_z, in.zn, form);
    const auto r_side = label_backward_inputs<Backend>(stats_r, grad_r, in.rn, form);
    at::Tensor gz = at::zeros_like(in.zn), gr = at::zeros_like(in.rn);
    if (in.zn.size(0) > 0 && in.rn.size(0) > 0) AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_cross_bwd", [&] {
      const auto a = in.template args<scalar_t>(similarity, beta);
      Backend::template cross_backward<scalar_t>(
          in.zn, in.rn, a.first, a.second, std::get<0>(z_side).template data_ptr<scalar_t>(),
          std::get<1>(z_side).template data_ptr<scalar_t>(), std::get<0>(r_side).template data_ptr<scalar_t>(),
          std::get<1>(r_side).template data_ptr<scalar_t>(), gz, gr);
    });
    const auto d_e = raw_grads(gz, e, iz), d_r = raw_grads(gr, r, ir);
    return {std::get<0>(d_e), std::get<1>(d_e), std::get<0>(d_r), std::get<1>(d_r)};
  }

  static void impl(torch::Library& m) {
    m.impl("oucl_label_cross_fwd", &fwd);
    m.impl("oucl_label_cross_bwd", &bwd);
  }
};

}  // namespace metaug_fast
