// Score-mode ops on CUDA: OUCL and InfoNCE (forward, backward, double backward) and margin statistics, the
// same ops as the CPU kernels (torch.ops.metaug_fast.oucl_score_*, margin_score_*) registered for the CUDA
// dispatch key, so the autograd Functions of metaug_fast/_ops/score.py run unchanged on CUDA tensors. The
// op bodies are ScoreOps of oucl_host.h, shared with the CPU; the kernels are here. One warp per row
// (warp.cuh): each lane streams a strided slice keeping its own running (max, sum) for both
// log-sum-exps, and the warp merges them with shuffles. fp32/fp16/bf16 inputs accumulate in fp32, fp64 in
// fp64. Stats layout and formulas are those of csrc/cpu/score_rows.inc.
// Launches, streams and device checks go through device.h, so this file also compiles as host C++ for the
// SIMT emulator (simt/), which runs these kernels on the CPU in tests/test_cuda_simt.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "device.h"
#include "warp.cuh"

namespace metaug_fast {
namespace {

template <int FORM, bool POS, typename T>
__device__ T expo(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return c.beta * x;  // only the negative side uses it
  else return Side<FORM, T, POS>::e(c, x);
}

template <int FORM, bool POS, typename T>
__device__ T expo_d1(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return c.beta;
  else return Side<FORM, T, POS>::d1(c, x);
}

template <int FORM, bool POS, typename T>
__device__ T expo_d2(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return T(0);
  else return Side<FORM, T, POS>::d2(c, x);
}

template <int FORM, bool POS, typename S, typename T>
__device__ Lse<T> side_lse(const Cfg<T>& c, const S* x, const bool* m, int64_t K, int lane) {
  Running<T> r;
  for (int64_t k = lane; k < K; k += kWarp)
    if (kept(m, k)) r.add(expo<FORM, POS>(c, static_cast<T>(x[k])));
  return warp_lse(r);
}

template <typename S, typename T>
__device__ T masked_sum(const S* x, const bool* m, int64_t K, int lane) {
  T acc = T(0);
  for (int64_t k = lane; k < K; k += kWarp)
    if (kept(m, k)) acc += static_cast<T>(x[k]);
  return warp_sum(acc);
}

__device__ bool any_kept(const bool* m, int64_t K, int lane) {
  bool any = false;
  for (int64_t k = lane; k < K && !any; k += kWarp) any = kept(m, k);
  return __any_sync(0xffffffffu, any);
}

// One warp's row: its slices of the inputs, outputs and stats (masks null when absent).
template <typename S, typename T>
struct WarpRow {
  int64_t i;
  int lane;
  const S *p, *n;
  const bool *pm, *nm;
  __device__ WarpRow(const ScoreArgs<S, T>& a)
      : i(warp_row()),
        lane(warp_lane()),
        p(a.pos + i * a.kp),
        n(a.neg + i * a.kn),
        pm(row_mask(a.pos_mask, i, a.kp)),
        nm(row_mask(a.neg_mask, i, a.kn)) {}
};

template <int FORM, typename S, typename T>
__global__ void forward_kernel(ScoreArgs<S, T> a) {
  const WarpRow<S, T> r(a);
  if (r.i >= a.B) return;
  const bool valid = any_kept(r.pm, a.kp, r.lane) && any_kept(r.nm, a.kn, r.lane);
  T out = T(0), st[kStats] = {};
  if (valid) {
    if constexpr (FORM == kHinge) {
      const T arg = masked_sum<S, T>(r.n, r.nm, a.kn, r.lane) - masked_sum<S, T>(r.p, r.pm, a.kp, r.lane) + a.cfg.lam;
      st[kHingeArg] = arg;
      out = arg > T(0) || arg != arg ? arg : T(0);
    } else if constexpr (FORM == kInfoNCE) {
      const Lse<T> C = side_lse<FORM, false>(a.cfg, r.n, r.nm, a.kn, r.lane);
      T loss = T(0), sig = T(0), cnt = T(0);
      for (int64_t k = r.lane; k < a.kp; k += kWarp) {
        if (!kept(r.pm, k)) continue;
        const T x = C.value() - a.cfg.beta * static_cast<T>(r.p[k]);
        loss += softplus(x);
        sig += sigmoid(x);
        cnt += T(1);
      }
      st[kNceShift] = C.shift;
      st[kNceLogSum] = C.log_sum;
      st[kNceSigmoidSum] = warp_sum(sig);
      st[kNceNPos] = warp_sum(cnt);
      out = warp_sum(loss) / st[kNceNPos];
    } else {
      const Lse<T> A = side_lse<FORM, true>(a.cfg, r.p, r.pm, a.kp, r.lane);
      const Lse<T> C = side_lse<FORM, false>(a.cfg, r.n, r.nm, a.kn, r.lane);
      st[kPosShift] = A.shift;
      st[kPosLogSum] = A.log_sum;
      st[kNegShift] = C.shift;
      st[kNegLogSum] = C.log_sum;
      out = softplus(A.value() + C.value()) * a.cfg.inv_beta;
    }
  }
  if (r.lane == 0) {
    a.rows[r.i] = out;
    st[kValid] = valid ? T(1) : T(0);
    for (int k = 0; k < kStats; ++k) a.stats[kStats * r.i + k] = st[k];
  }
}

template <int FORM, typename S, typename T>
__global__ void backward_kernel(ScoreArgs<S, T> a) {
  const WarpRow<S, T> r(a);
  if (r.i >= a.B) return;
  const T* st = a.stats + kStats * r.i;
  S* gp = a.out_pos + r.i * a.kp;
  S* gn = a.out_neg + r.i * a.kn;
  const bool valid = st[kValid] != T(0);
  const T g = a.grad_rows[r.i];
  if constexpr (FORM == kHinge) {
    const T on = valid && st[kHingeArg] > T(0) ? g : T(0);
    for (int64_t k = r.lane; k < a.kp; k += kWarp) gp[k] = static_cast<S>(kept(r.pm, k) ? -on : T(0));
    for (int64_t k = r.lane; k < a.kn; k += kWarp) gn[k] = static_cast<S>(kept(r.nm, k) ? on : T(0));
  } else if constexpr (FORM == kInfoNCE) {
    const Lse<T> C = stat_lse(st, kNceShift, kNceLogSum);
    const T coef = valid ? g / st[kNceNPos] : T(0);
    for (int64_t k = r.lane; k < a.kp; k += kWarp) {
      const T x = C.value() - a.cfg.beta * static_cast<T>(r.p[k]);
      gp[k] = static_cast<S>(valid && kept(r.pm, k) ? -coef * a.cfg.beta * sigmoid(x) : T(0));
    }
    for (int64_t k = r.lane; k < a.kn; k += kWarp) {
      const T w = weight(a.cfg.beta * static_cast<T>(r.n[k]), C);
      gn[k] = static_cast<S>(valid && kept(r.nm, k) ? coef * st[kNceSigmoidSum] * a.cfg.beta * w : T(0));
    }
  } else {
    const Lse<T> A = stat_lse(st, kPosShift, kPosLogSum), C = stat_lse(st, kNegShift, kNegLogSum);
    const T coef = valid ? g * a.cfg.inv_beta * sigmoid(A.value() + C.value()) : T(0);
    for (int64_t k = r.lane; k < a.kp; k += kWarp) {
      const T x = static_cast<T>(r.p[k]);
      const T v = coef * weight(expo<FORM, true>(a.cfg, x), A) * expo_d1<FORM, true>(a.cfg, x);
      gp[k] = static_cast<S>(valid && kept(r.pm, k) ? v : T(0));
    }
    for (int64_t k = r.lane; k < a.kn; k += kWarp) {
      const T x = static_cast<T>(r.n[k]);
      const T v = coef * weight(expo<FORM, false>(a.cfg, x), C) * expo_d1<FORM, false>(a.cfg, x);
      gn[k] = static_cast<S>(valid && kept(r.nm, k) ? v : T(0));
    }
  }
}

// One side's share of the directional derivative, Σ_k w_k·e'_k·t_k (w the softmax weight).
template <int FORM, bool POS, typename S, typename T>
__device__ T side_dot(const Cfg<T>& c, const S* x, const bool* m, const S* t, int64_t K, Lse<T> lse, int lane) {
  T acc = T(0);
  for (int64_t k = lane; k < K; k += kWarp) {
    if (!kept(m, k)) continue;
    const T xv = static_cast<T>(x[k]);
    acc += weight(expo<FORM, POS>(c, xv), lse) * expo_d1<FORM, POS>(c, xv) * static_cast<T>(t[k]);
  }
  return warp_sum(acc);
}

// One side's Hessian-vector product, c1·w·e' + c2·w·(e'·(e'·t - t_side) + e''·t), as in score_rows.inc.
template <int FORM, bool POS, typename S, typename T>
__device__ void side_hvp(const Cfg<T>& c, const S* x, const bool* m, const S* t, int64_t K, Lse<T> lse, T c1, T c2,
                         T t_side, int lane, S* out) {
  for (int64_t k = lane; k < K; k += kWarp) {
    const T xv = static_cast<T>(x[k]), tk = static_cast<T>(t[k]);
    const T w = weight(expo<FORM, POS>(c, xv), lse), d1 = expo_d1<FORM, POS>(c, xv);
    const T h = w * d1 * c1 + c2 * w * (d1 * (d1 * tk - t_side) + expo_d2<FORM, POS>(c, xv) * tk);
    out[k] = static_cast<S>(kept(m, k) ? h : T(0));
  }
}

// Double backward, the formulas of csrc/cpu/score_rows.inc (double_backward_rows, infonce_double_backward_rows).
template <int FORM, typename S, typename T>
__global__ void double_backward_kernel(ScoreArgs<S, T> a) {
  const WarpRow<S, T> r(a);
  if (r.i >= a.B) return;
  const S* tp = a.gg_pos + r.i * a.kp;
  const S* tn = a.gg_neg + r.i * a.kn;
  const T* st = a.stats + kStats * r.i;
  S* hp = a.out_pos + r.i * a.kp;
  S* hn = a.out_neg + r.i * a.kn;
  const bool valid = st[kValid] != T(0);
  const T g = a.grad_rows[r.i];
  if (!valid || FORM == kHinge) {
    T dir = T(0);
    if (FORM == kHinge && valid && st[kHingeArg] > T(0))
      dir = masked_sum<S, T>(tn, r.nm, a.kn, r.lane) - masked_sum<S, T>(tp, r.pm, a.kp, r.lane);
    if (r.lane == 0) a.grad_grad_rows[r.i] = dir;
    for (int64_t k = r.lane; k < a.kp; k += kWarp) hp[k] = static_cast<S>(0);
    for (int64_t k = r.lane; k < a.kn; k += kWarp) hn[k] = static_cast<S>(0);
    return;
  }
  if constexpr (FORM == kInfoNCE) {
    const T beta = a.cfg.beta, n_p = st[kNceNPos], S_sig = st[kNceSigmoidSum];
    const Lse<T> C = stat_lse(st, kNceShift, kNceLogSum);
    const T wt = side_dot<FORM, false>(a.cfg, r.n, r.nm, tn, a.kn, C, r.lane) / beta;  // ⟨ω, t_n⟩
    T sig_t = T(0), dsig = T(0), dsig_t = T(0);
    for (int64_t k = r.lane; k < a.kp; k += kWarp) {
      if (!kept(r.pm, k)) continue;
      const T x = C.value() - beta * static_cast<T>(r.p[k]);
      const T s = sigmoid(x), ds = s * sigmoid(-x), t = static_cast<T>(tp[k]);
      sig_t += s * t;
      dsig += ds;
      dsig_t += ds * t;
    }
    sig_t = warp_sum(sig_t);
    dsig = warp_sum(dsig);
    dsig_t = warp_sum(dsig_t);
    if (r.lane == 0) a.grad_grad_rows[r.i] = beta / n_p * (S_sig * wt - sig_t);
    const T c = g * beta * beta / n_p, k0 = wt * dsig - dsig_t - S_sig * wt;
    for (int64_t k = r.lane; k < a.kp; k += kWarp) {
      const T x = C.value() - beta * static_cast<T>(r.p[k]);
      hp[k] = static_cast<S>(kept(r.pm, k) ? c * sigmoid(x) * sigmoid(-x) * (static_cast<T>(tp[k]) - wt) : T(0));
    }
    for (int64_t k = r.lane; k < a.kn; k += kWarp) {
      const T w = weight(beta * static_cast<T>(r.n[k]), C);
      hn[k] = static_cast<S>(kept(r.nm, k) ? c * w * (S_sig * static_cast<T>(tn[k]) + k0) : T(0));
    }
  } else if constexpr (FORM != kHinge) {
    const Lse<T> A = stat_lse(st, kPosShift, kPosLogSum), C = stat_lse(st, kNegShift, kNegLogSum);
    const T s = sigmoid(A.value() + C.value()), one_minus_s = sigmoid(-(A.value() + C.value()));
    const T ta = side_dot<FORM, true>(a.cfg, r.p, r.pm, tp, a.kp, A, r.lane);
    const T tb = side_dot<FORM, false>(a.cfg, r.n, r.nm, tn, a.kn, C, r.lane);
    const T t = ta + tb;
    if (r.lane == 0) a.grad_grad_rows[r.i] = a.cfg.inv_beta * s * t;
    const T c1 = g * a.cfg.inv_beta * s * one_minus_s * t, c2 = g * a.cfg.inv_beta * s;
    side_hvp<FORM, true>(a.cfg, r.p, r.pm, tp, a.kp, A, c1, c2, ta, r.lane, hp);
    side_hvp<FORM, false>(a.cfg, r.n, r.nm, tn, a.kn, C, c1, c2, tb, r.lane, hn);
  }
}

// ------------------------------------------------------------------------------ margin statistics
// Per row: min over kept positives, max over kept negatives, with tie counts (NaN sticky, as torch.amin);
// stats (p_min, n_max, ties_p, ties_n, valid). The backward shares ∂/∂p_min, ∂/∂n_max among the ties.
template <bool MIN, typename S, typename T>
__device__ void row_extremum(const S* x, const bool* m, int64_t K, int lane, T& value, T& ties) {
  value = MIN ? std::numeric_limits<T>::infinity() : -std::numeric_limits<T>::infinity();
  ties = T(0);
  for (int64_t k = lane; k < K; k += kWarp)
    if (kept(m, k)) merge_extremum<MIN>(value, ties, static_cast<T>(x[k]), T(1));
  warp_extremum<MIN>(value, ties);
}

template <typename S, typename T>
__global__ void margin_forward_kernel(ScoreArgs<S, T> a) {
  const WarpRow<S, T> r(a);
  if (r.i >= a.B) return;
  T pmin, tp, nmax, tn;
  row_extremum<true>(r.p, r.pm, a.kp, r.lane, pmin, tp);
  row_extremum<false>(r.n, r.nm, a.kn, r.lane, nmax, tn);
  if (r.lane == 0) {
    T* st = a.stats + kStats * r.i;
    st[kPMin] = pmin;
    st[kNMax] = nmax;
    st[kTiesPos] = tp;
    st[kTiesNeg] = tn;
    st[kValid] = tp > T(0) && tn > T(0) ? T(1) : T(0);
  }
}

template <typename S, typename T>
__global__ void margin_backward_kernel(ScoreArgs<S, T> a) {
  const WarpRow<S, T> r(a);
  if (r.i >= a.B) return;
  const T* st = a.stats + kStats * r.i;
  const bool valid = st[kValid] != T(0);
  const T gp = valid ? a.grad_rows[2 * r.i] / st[kTiesPos] : T(0), gn = valid ? a.grad_rows[2 * r.i + 1] / st[kTiesNeg] : T(0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const bool p_nan = st[kPMin] != st[kPMin], n_nan = st[kNMax] != st[kNMax];
  for (int64_t k = r.lane; k < a.kp; k += kWarp) {
    const bool keep = kept(r.pm, k);
    a.out_pos[r.i * a.kp + k] = static_cast<S>(keep && p_nan ? nan : keep && static_cast<T>(r.p[k]) == st[kPMin] ? gp : T(0));
  }
  for (int64_t k = r.lane; k < a.kn; k += kWarp) {
    const bool keep = kept(r.nm, k);
    a.out_neg[r.i * a.kn + k] = static_cast<S>(keep && n_nan ? nan : keep && static_cast<T>(r.n[k]) == st[kNMax] ? gn : T(0));
  }
}

// The kernels of each pass and form, for ScoreOps.
struct CudaScore : device::Backend {
  template <typename S, typename T>
  static void run(Pass pass, int64_t form, const ScoreArgs<S, T>& a) {
    const dim3 grid = warp_grid(a.B), block = warp_block();
    const cudaStream_t stream = device::current_stream();
    with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      if constexpr (FORM == kMargin) {
        if (pass == Pass::kForward) device::launch(margin_forward_kernel<S, T>, grid, block, stream, a);
        else device::launch(margin_backward_kernel<S, T>, grid, block, stream, a);
      } else {
        switch (pass) {
          case Pass::kForward: device::launch(forward_kernel<FORM, S, T>, grid, block, stream, a); break;
          case Pass::kBackward: device::launch(backward_kernel<FORM, S, T>, grid, block, stream, a); break;
          case Pass::kDoubleBackward: device::launch(double_backward_kernel<FORM, S, T>, grid, block, stream, a); break;
        }
      }
    });
  }
};

}  // namespace

// The CUDA kernels of the score-mode ops whose schemas define_kernel_ops gives.
void impl_score_ops(torch::Library& m) { ScoreOps<CudaScore>::impl(m); }

}  // namespace metaug_fast
