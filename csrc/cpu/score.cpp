// Score-mode ops on the CPU: OUCL and InfoNCE (fused forward, backward and double backward) and margin
// statistics (forward, backward), one pass over each row, rows spread over threads with at::parallel_for
// (OpenMP). The op bodies (checks, outputs, argument packing) are ScoreOps of oucl_host.h, shared with
// CUDA; this file gives them the CPU's row kernels (score_rows.inc). Registered as torch ops in the
// `metaug_fast` namespace (schemas in op_schemas.h); metaug_fast/_ops/score.py wraps them in autograd
// Functions. fp16/bf16 inputs accumulate in fp32 (at::opmath_type), fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "../op_schemas.h"
#include "isa.h"

namespace metaug_fast {
#define METAUG_ROWS "score_rows.inc"
#include "compile_per_isa.inc"
#undef METAUG_ROWS

namespace {

// The kernel of (pass, form, masks) for the machine's instruction set, over rows [b0, b1).
template <int FORM, typename T, bool PM, bool NM, typename S>
void run_rows(Pass pass, const ScoreArgs<S, T>& a, int64_t b0, int64_t b1) {
  METAUG_ISA_SWITCH(
    if constexpr (FORM == kMargin) {
      if (pass == Pass::kForward) ns::margin_forward_rows<T, PM, NM>(a, b0, b1);
      else ns::margin_backward_rows<T, PM, NM>(a, b0, b1);
    } else if constexpr (FORM == kInfoNCE) {
      switch (pass) {
        case Pass::kForward: ns::infonce_forward_rows<T, PM, NM>(a, b0, b1); break;
        case Pass::kBackward: ns::infonce_backward_rows<T, PM, NM>(a, b0, b1); break;
        case Pass::kDoubleBackward: ns::infonce_double_backward_rows<T, PM, NM>(a, b0, b1); break;
      }
    } else {
      switch (pass) {
        case Pass::kForward: ns::forward_rows<FORM, T, PM, NM>(a, b0, b1); break;
        case Pass::kBackward: ns::backward_rows<FORM, T, PM, NM>(a, b0, b1); break;
        case Pass::kDoubleBackward: ns::double_backward_rows<FORM, T, PM, NM>(a, b0, b1); break;
      }
    })
}

// f(PM, NM) with the masks' presence as compile-time constants (std::bool_constant), so that each of the
// four combinations is a kernel of its own.
template <typename F>
void with_masks(bool pm, bool nm, F&& f) {
  if (pm && nm) f(std::true_type{}, std::true_type{});
  else if (pm) f(std::true_type{}, std::false_type{});
  else if (nm) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

// The kernels of each pass and form, for ScoreOps.
struct CpuScore : CpuDevice {
  template <typename S, typename T>
  static void run(Pass pass, int64_t form, const ScoreArgs<S, T>& a) {
    // Rows are independent: each is handled by one thread, so results do not depend on the thread count.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.kp + a.kn));
    at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
      with_form(form, [&](auto f) {
        with_masks(a.pos_mask, a.neg_mask, [&](auto pm, auto nm) {
          run_rows<decltype(f)::value, T, decltype(pm)::value, decltype(nm)::value>(pass, a, b0, b1);
        });
      });
    });
  }
};

// oucl_score_fwd_grad's kernels. The exponential forms on fp32/fp64 scores run forward_grad_rows: the
// gradient from the forward's own exponentials, one exp per entry. The others (hinge, InfoNCE, fp16/bf16,
// whose gradient storage cannot hold the exponentials exactly) run each block of rows (about 64 KiB) forward,
// then at once backward with the given grad_rows, while it is still in cache. Either way the inputs are
// read from memory once and the gradient written once, where a forward and a later backward read them twice.
constexpr bool is_exp_form(int64_t form) { return form == kSquared || form == kWeighted || form == kCircle; }

struct CpuScoreWithGrad : CpuDevice {
  template <typename S, typename T>
  static void run(Pass, int64_t form, const ScoreArgs<S, T>& a) {
    const int64_t per_row = std::max<int64_t>(1, a.kp + a.kn);
    const int64_t block = std::max<int64_t>(1, (int64_t(64) * 1024 / int64_t(sizeof(S))) / per_row);
    const int64_t grain = std::max<int64_t>(block, 16384 / per_row);
    at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
      with_form(form, [&](auto f) {
        with_masks(a.pos_mask, a.neg_mask, [&](auto pm_c, auto nm_c) {
          constexpr int FORM = decltype(f)::value;
          constexpr bool PM = decltype(pm_c)::value, NM = decltype(nm_c)::value;
          if constexpr (std::is_same_v<S, T> && is_exp_form(FORM)) {
            std::vector<T> shifts((a.kp + 255) / 256 + (a.kn + 255) / 256);
            METAUG_ISA_SWITCH(ns::forward_grad_rows<FORM, T, PM, NM>(a, b0, b1, shifts.data());)
          } else if constexpr (FORM != kMargin) {
            for (int64_t r0 = b0; r0 < b1; r0 += block) {
              const int64_t r1 = std::min(b1, r0 + block);
              for (Pass pass : {Pass::kForward, Pass::kBackward}) run_rows<FORM, T, PM, NM>(pass, a, r0, r1);
            }
          }
        });
      });
    });
  }
};

// torch.ops.metaug_fast.oucl_score_fwd_grad: the forward (rows [B], stats [B,kStats]) and, in the same sweep,
// the gradient (grad_pos [B,K⁺], grad_neg [B,K⁻], input dtype) for the row weights grad_rows [B] (the
// reduction's: 1/n_valid for a mean), for OUCL and InfoNCE.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_fwd_grad(
    const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
    const c10::optional<at::Tensor>& neg_mask, const at::Tensor& grad_rows, int64_t form, double beta,
    double gamma_pos, double gamma_neg, double margin, double lam) {
  using Ops = ScoreOps<CpuScoreWithGrad>;
  TORCH_CHECK(form != kMargin, "oucl_score_fwd_grad: margin statistics have no fused gradient");
  const ScoreInputs in = Ops::inputs(pos, neg, pos_mask, neg_mask, form);
  const at::Tensor g = Ops::grad_rows(grad_rows, pos, 1);
  at::Tensor rows = at::empty({pos.size(0)}, Ops::acc_options(pos));
  at::Tensor stats = at::empty({pos.size(0), kStats}, Ops::acc_options(pos));
  at::Tensor gp = at::empty_like(in.pos), gn = at::empty_like(in.neg);
  Ops::dispatch(Pass::kForward, form, in, beta, gamma_pos, gamma_neg, margin, lam, [&](auto& a) {
    using T = std::remove_pointer_t<decltype(a.rows)>;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(a.pos)>>;
    a.rows = rows.data_ptr<T>();
    a.stats = stats.data_ptr<T>();
    a.grad_rows = g.data_ptr<T>();
    a.out_pos = gp.data_ptr<S>();
    a.out_neg = gn.data_ptr<S>();
  });
  return {rows, stats, gp, gn};
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
  define_kernel_ops(m);
  m.def("oucl_score_fwd_grad(Tensor pos, Tensor neg, Tensor? pos_mask, Tensor? neg_mask, Tensor grad_rows, "
        "int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) {
  ScoreOps<CpuScore>::impl(m);
  m.impl("oucl_score_fwd_grad", &score_fwd_grad);
}

}  // namespace metaug_fast
