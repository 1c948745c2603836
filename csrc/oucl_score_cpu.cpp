// Score-mode OUCL on the CPU: fused forward, backward and double backward, one pass over each row,
// rows spread over threads with at::parallel_for (OpenMP). Registered as torch ops in the `metaug_fast`
// namespace; metaug_fast/_ops/oucl_score.py wraps them in autograd Functions.
//
//   oucl_score_fwd(pos [B,K⁺], neg [B,K⁻], pos_mask?, neg_mask?, form, β, γ⁺, γ⁻, m, λ)
//       -> (rows [B], stats [B,5]: row log-sum-exps and validity), both in the accumulation dtype
//   oucl_score_bwd(grad_rows [B] (accumulation dtype), pos, neg, pos_mask?, neg_mask?, stats, ...) -> (grad_pos, grad_neg)
//   oucl_score_bwd_bwd(grad_rows, gg_pos, gg_neg, pos, neg, pos_mask?, neg_mask?, stats, ...)
//       -> (grad_grad_rows [B], hv_pos [B,K⁺], hv_neg [B,K⁻])
//
// fp16/bf16 inputs accumulate in fp32 (at::opmath_type), fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace metaug_fast {
namespace {

enum FormId : int64_t { kHinge = 0, kSquared = 1, kWeighted = 2, kCircle = 3 };
constexpr int64_t kStats = 5;  // per-row values saved by the forward, layout in oucl_score_rows.inc

template <typename T>
struct Cfg {
  T beta, inv_beta, gamma_pos, gamma_neg, margin, lam;
};

// Raw pointers for the row kernels; which fields a kernel reads or writes is documented there.
template <typename S, typename T>
struct RowArgs {
  Cfg<T> cfg;
  int64_t kp = 0, kn = 0;
  const S* pos = nullptr;
  const S* neg = nullptr;
  const bool* pos_mask = nullptr;
  const bool* neg_mask = nullptr;
  const T* grad_rows = nullptr;
  const S* gg_pos = nullptr;
  const S* gg_neg = nullptr;
  T* stats = nullptr;
  T* rows = nullptr;
  S* out_pos = nullptr;
  S* out_neg = nullptr;
  T* grad_grad_rows = nullptr;
};

// One copy of the row kernels per instruction set. GCC attaches the target of the enclosing pragma to
// every function declared under it, templates included, so each namespace is vectorized for its ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define METAUG_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,bmi2")
namespace isa_avx512 {
#include "oucl_score_rows.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace isa_avx2 {
#include "oucl_score_rows.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif
namespace isa_base {
#include "oucl_score_rows.inc"
}  // namespace isa_base

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef METAUG_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

enum class Pass { kForward, kBackward, kDoubleBackward };

// Picks the kernel for (ISA, pass, form, masks) and runs it over a range of rows.
template <int FORM, typename T, bool PM, bool NM, typename S>
void run_rows(Pass pass, const RowArgs<S, T>& a, int64_t b0, int64_t b1) {
#define METAUG_RUN(NS)                                                                  \
  switch (pass) {                                                                       \
    case Pass::kForward: NS::forward_rows<FORM, T, PM, NM>(a, b0, b1); return;          \
    case Pass::kBackward: NS::backward_rows<FORM, T, PM, NM>(a, b0, b1); return;        \
    case Pass::kDoubleBackward: NS::double_backward_rows<FORM, T, PM, NM>(a, b0, b1); return; \
  }
#ifdef METAUG_MULTI_ISA
  switch (active_isa()) {
    case Isa::kAvx512: METAUG_RUN(isa_avx512) break;
    case Isa::kAvx2: METAUG_RUN(isa_avx2) break;
    case Isa::kBase: break;
  }
#endif
  METAUG_RUN(isa_base)
#undef METAUG_RUN
}

template <typename T, typename S>
void launch(Pass pass, int64_t form, bool pm, bool nm, int64_t B, const RowArgs<S, T>& a) {
  // Rows are independent: each is handled by one thread, so results do not depend on the thread count.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.kp + a.kn));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
#define METAUG_MASKS(FORM)                                                    \
  if (pm && nm) run_rows<FORM, T, true, true>(pass, a, b0, b1);               \
  else if (pm) run_rows<FORM, T, true, false>(pass, a, b0, b1);               \
  else if (nm) run_rows<FORM, T, false, true>(pass, a, b0, b1);               \
  else run_rows<FORM, T, false, false>(pass, a, b0, b1);
    switch (form) {
      case kHinge: METAUG_MASKS(kHinge) break;
      case kSquared: METAUG_MASKS(kSquared) break;
      case kWeighted: METAUG_MASKS(kWeighted) break;
      case kCircle: METAUG_MASKS(kCircle) break;
    }
#undef METAUG_MASKS
  });
}

struct Inputs {
  at::Tensor pos, neg, pos_mask, neg_mask;  // contiguous; masks undefined when absent
};

Inputs check_inputs(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                    const c10::optional<at::Tensor>& neg_mask, int64_t form) {
  TORCH_CHECK(pos.device().is_cpu() && neg.device().is_cpu(), "oucl_score (cpp): pos and neg must be CPU tensors");
  TORCH_CHECK(pos.dim() == 2 && neg.dim() == 2, "oucl_score (cpp): pos and neg must be 2-D");
  TORCH_CHECK(pos.size(0) == neg.size(0), "oucl_score (cpp): pos and neg must have the same number of rows");
  TORCH_CHECK(pos.scalar_type() == neg.scalar_type(), "oucl_score (cpp): pos and neg must have the same dtype");
  TORCH_CHECK(form >= kHinge && form <= kCircle, "oucl_score (cpp): unknown form id ", form);
  Inputs in{pos.contiguous(), neg.contiguous(), at::Tensor(), at::Tensor()};
  if (pos_mask.has_value()) {
    TORCH_CHECK(pos_mask->scalar_type() == at::kBool && pos_mask->sizes() == pos.sizes(),
                "oucl_score (cpp): pos_mask must be a bool tensor shaped like pos");
    in.pos_mask = pos_mask->contiguous();
  }
  if (neg_mask.has_value()) {
    TORCH_CHECK(neg_mask->scalar_type() == at::kBool && neg_mask->sizes() == neg.sizes(),
                "oucl_score (cpp): neg_mask must be a bool tensor shaped like neg");
    in.neg_mask = neg_mask->contiguous();
  }
  return in;
}

template <typename S, typename T>
RowArgs<S, T> make_args(const Inputs& in, double beta, double gamma_pos, double gamma_neg, double margin,
                        double lam) {
  RowArgs<S, T> a;
  a.cfg = Cfg<T>{T(beta), T(1.0 / beta), T(gamma_pos), T(gamma_neg), T(margin), T(lam)};
  a.kp = in.pos.size(1);
  a.kn = in.neg.size(1);
  a.pos = in.pos.data_ptr<S>();
  a.neg = in.neg.data_ptr<S>();
  a.pos_mask = in.pos_mask.defined() ? in.pos_mask.data_ptr<bool>() : nullptr;
  a.neg_mask = in.neg_mask.defined() ? in.neg_mask.data_ptr<bool>() : nullptr;
  return a;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_stats(const at::Tensor& stats, const at::Tensor& pos) {
  TORCH_CHECK(stats.scalar_type() == acc_type(pos.scalar_type()) && stats.dim() == 2 &&
                  stats.size(0) == pos.size(0) && stats.size(1) == kStats && stats.is_contiguous(),
              "oucl_score (cpp): stats must be the [B,5] tensor returned by oucl_score_fwd");
}

void check_grad_rows(const at::Tensor& g, const at::Tensor& pos) {
  TORCH_CHECK(g.dim() == 1 && g.size(0) == pos.size(0) && g.scalar_type() == acc_type(pos.scalar_type()),
              "oucl_score (cpp): grad_rows must be [B] in the accumulation dtype of pos");
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes() && t.device() == like.device(),
              "oucl_score (cpp): ", name, " must match ", like.sizes(), " ", like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> oucl_score_fwd(const at::Tensor& pos, const at::Tensor& neg,
                                                  const c10::optional<at::Tensor>& pos_mask,
                                                  const c10::optional<at::Tensor>& neg_mask, int64_t form,
                                                  double beta, double gamma_pos, double gamma_neg, double margin,
                                                  double lam) {
  const Inputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  const int64_t B = pos.size(0);
  at::Tensor rows = at::empty({B}, pos.options().dtype(acc_type(pos.scalar_type())));
  at::Tensor stats = at::empty({B, kStats}, pos.options().dtype(acc_type(pos.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.rows = rows.data_ptr<T>();
    a.stats = stats.data_ptr<T>();
    launch<T>(Pass::kForward, form, a.pos_mask, a.neg_mask, B, a);
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> oucl_score_bwd(const at::Tensor& grad_rows, const at::Tensor& pos,
                                                  const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                                                  const c10::optional<at::Tensor>& neg_mask, const at::Tensor& stats,
                                                  int64_t form, double beta, double gamma_pos, double gamma_neg,
                                                  double margin, double lam) {
  const Inputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  check_stats(stats, pos);
  const at::Tensor g = grad_rows.contiguous();
  check_grad_rows(g, pos);
  at::Tensor grad_pos = at::empty_like(in.pos);
  at::Tensor grad_neg = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.out_pos = grad_pos.data_ptr<scalar_t>();
    a.out_neg = grad_neg.data_ptr<scalar_t>();
    launch<T>(Pass::kBackward, form, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return {grad_pos, grad_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> oucl_score_bwd_bwd(
    const at::Tensor& grad_rows, const at::Tensor& gg_pos, const at::Tensor& gg_neg, const at::Tensor& pos,
    const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask, const c10::optional<at::Tensor>& neg_mask,
    const at::Tensor& stats, int64_t form, double beta, double gamma_pos, double gamma_neg, double margin,
    double lam) {
  const Inputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  check_stats(stats, pos);
  check_like(gg_pos, pos, "gg_pos");
  check_like(gg_neg, neg, "gg_neg");
  const at::Tensor g = grad_rows.contiguous();
  check_grad_rows(g, pos);
  const at::Tensor tp = gg_pos.contiguous(), tn = gg_neg.contiguous();
  at::Tensor ggo = at::empty_like(g);
  at::Tensor hv_pos = at::empty_like(in.pos);
  at::Tensor hv_neg = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.gg_pos = tp.data_ptr<scalar_t>();
    a.gg_neg = tn.data_ptr<scalar_t>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.grad_grad_rows = ggo.data_ptr<T>();
    a.out_pos = hv_pos.data_ptr<scalar_t>();
    a.out_neg = hv_neg.data_ptr<scalar_t>();
    launch<T>(Pass::kDoubleBackward, form, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return {ggo, hv_pos, hv_neg};
}

std::string cpu_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBase: break;
  }
  return "baseline";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metaug_fast, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
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
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) {
  m.impl("oucl_score_fwd", &oucl_score_fwd);
  m.impl("oucl_score_bwd", &oucl_score_bwd);
  m.impl("oucl_score_bwd_bwd", &oucl_score_bwd_bwd);
}

}  // namespace metaug_fast
