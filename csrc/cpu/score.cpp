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

// The kernels of each pass and form, for ScoreOps.
struct CpuScore : CpuDevice {
  template <typename S, typename T>
  static void run(Pass pass, int64_t form, const ScoreArgs<S, T>& a) {
    // Rows are independent: each is handled by one thread, so results do not depend on the thread count.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.kp + a.kn));
    const bool pm = a.pos_mask, nm = a.neg_mask;
    at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
      with_form(form, [&](auto f) {
        constexpr int FORM = decltype(f)::value;
        if (pm && nm) run_rows<FORM, T, true, true>(pass, a, b0, b1);
        else if (pm) run_rows<FORM, T, true, false>(pass, a, b0, b1);
        else if (nm) run_rows<FORM, T, false, true>(pass, a, b0, b1);
        else run_rows<FORM, T, false, false>(pass, a, b0, b1);
      });
    });
  }
};

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
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) { ScoreOps<CpuScore>::impl(m); }

}  // namespace metaug_fast
