// Score-mode OUCL, InfoNCE and margin statistics on CUDA: the same ops as the CPU kernels (torch.ops.metaug_fast.oucl_score_*),
// registered for the CUDA dispatch key, so the autograd Functions in metaug_fast/_ops/oucl_score.py run
// unchanged on CUDA tensors. One warp per row: each lane streams a strided slice of the row keeping its own
// running (max, sum) for both log-sum-exps, and the warp merges them with shuffles. fp32/fp16/bf16 inputs
// accumulate in fp32, fp64 in fp64. Stats layout and formulas are those of csrc/oucl_rows.inc.
// Launches, streams and device checks go through device.h, so this file also compiles as host C++ for the
// SIMT emulator (simt/), which runs these kernels on the CPU in tests/test_cuda_simt.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "device.h"

namespace metaug_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;


template <typename T>
struct Running {  // a lane's online log-sum-exp: LSE = m + log(s), m = -inf while empty
  T m = -std::numeric_limits<T>::infinity();
  T s = T(0);
  __device__ void add(T e) {
    if (e > m) {
      s = (s == T(0) ? T(0) : s * exp(m - e)) + T(1);
      m = e;
    } else if (e != -std::numeric_limits<T>::infinity()) {
      s += exp(e - m);  // NaN propagates into s
    }
  }
  __device__ void merge(T om, T os) {
    if (os == T(0)) return;
    if (s == T(0)) {
      m = om;
      s = os;
      return;
    }
    const T nm = m > om ? m : om;
    s = s * exp(m - nm) + os * exp(om - nm);
    m = nm;
  }
};

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp-wide LSE as (shift, log_sum) with torch.logsumexp's convention: an infinite max shifts by 0.
template <typename T>
__device__ void warp_lse(Running<T> r, T& shift, T& log_sum) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T om = __shfl_xor_sync(0xffffffffu, r.m, o);
    const T os = __shfl_xor_sync(0xffffffffu, r.s, o);
    r.merge(om, os);
  }
  const bool finite = isfinite(r.m);
  shift = finite ? r.m : T(0);
  log_sum = finite ? log(r.s) : (r.s == T(0) ? -std::numeric_limits<T>::infinity() : log(r.s * exp(r.m)));
}

template <typename T>
__device__ T softplus_d(T x) {
  return x > T(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

template <typename T>
__device__ T sigmoid_d(T x) {
  return T(1) / (T(1) + exp(-x));
}

template <typename S, typename T>
struct Args {
  Cfg<T> cfg;
  int64_t B, kp, kn;
  const S* pos;
  const S* neg;
  const bool* pos_mask;
  const bool* neg_mask;
  const T* grad_rows;
  const S* gg_pos;
  const S* gg_neg;
  T* stats;
  T* rows;
  S* out_pos;
  S* out_neg;
  T* grad_grad_rows;
};

__device__ inline bool kept(const bool* m, int64_t k) { return m == nullptr || m[k]; }

__device__ inline const bool* row_mask(const bool* m, int64_t i, int64_t K) { return m ? m + i * K : nullptr; }

template <int FORM, bool POS, typename T>
__device__ T expo(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return c.beta * x;  // only the negative side uses it
  else return POS ? Terms<FORM, T>::u(c, x) : Terms<FORM, T>::v(c, x);
}

template <int FORM, bool POS, typename T>
__device__ T expo_d1(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return c.beta;
  else return POS ? Terms<FORM, T>::du(c, x) : Terms<FORM, T>::dv(c, x);
}

template <int FORM, bool POS, typename T>
__device__ T expo_d2(const Cfg<T>& c, T x) {
  if constexpr (FORM == kInfoNCE) return T(0);
  else return POS ? Terms<FORM, T>::d2u(c, x) : Terms<FORM, T>::d2v(c, x);
}

template <int FORM, bool POS, typename S, typename T>
__device__ void side_lse(const Cfg<T>& c, const S* x, const bool* m, int64_t K, int lane, T& shift, T& log_sum) {
  Running<T> r;
  for (int64_t k = lane; k < K; k += kWarp)
    if (kept(m, k)) r.add(expo<FORM, POS>(c, static_cast<T>(x[k])));
  warp_lse(r, shift, log_sum);
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

template <int FORM, typename S, typename T>
__global__ void forward_kernel(Args<S, T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const S *p = a.pos + i * a.kp, *n = a.neg + i * a.kn;
  const bool *pm = row_mask(a.pos_mask, i, a.kp), *nm = row_mask(a.neg_mask, i, a.kn);
  T* st = a.stats + kStats * i;
  const bool valid = any_kept(pm, a.kp, lane) && any_kept(nm, a.kn, lane);
  T out = T(0), s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
  if (valid) {
    if constexpr (FORM == kHinge) {
      s0 = masked_sum<S, T>(n, nm, a.kn, lane) - masked_sum<S, T>(p, pm, a.kp, lane) + a.cfg.lam;
      out = s0 > T(0) || s0 != s0 ? s0 : T(0);
    } else if constexpr (FORM == kInfoNCE) {
      side_lse<FORM, false>(a.cfg, n, nm, a.kn, lane, s0, s1);
      const T C = s0 + s1;
      T loss = T(0), sig = T(0), cnt = T(0);
      for (int64_t k = lane; k < a.kp; k += kWarp) {
        if (!kept(pm, k)) continue;
        const T x = C - a.cfg.beta * static_cast<T>(p[k]);
        loss += softplus_d(x);
        sig += sigmoid_d(x);
        cnt += T(1);
      }
      loss = warp_sum(loss);
      s2 = warp_sum(sig);
      s3 = warp_sum(cnt);
      out = loss / s3;
    } else {
      side_lse<FORM, true>(a.cfg, p, pm, a.kp, lane, s0, s1);
      side_lse<FORM, false>(a.cfg, n, nm, a.kn, lane, s2, s3);
      out = softplus_d(s0 + s1 + s2 + s3) * a.cfg.inv_beta;
    }
  }
  if (lane == 0) {
    a.rows[i] = out;
    st[kPosShift] = s0;
    st[kPosLogSum] = s1;
    st[kNegShift] = s2;
    st[kNegLogSum] = s3;
    st[kValid] = valid ? T(1) : T(0);
  }
}

// Softmax weight of one entry: exp((e - shift) - log_sum).
template <typename T>
__device__ T weight(T e, T shift, T log_sum) {
  return exp((e - shift) - log_sum);
}

template <int FORM, typename S, typename T>
__global__ void backward_kernel(Args<S, T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const S *p = a.pos + i * a.kp, *n = a.neg + i * a.kn;
  const bool *pm = row_mask(a.pos_mask, i, a.kp), *nm = row_mask(a.neg_mask, i, a.kn);
  const T* st = a.stats + kStats * i;
  S* gp = a.out_pos + i * a.kp;
  S* gn = a.out_neg + i * a.kn;
  const bool valid = st[kValid] != T(0);
  const T g = a.grad_rows[i];
  if constexpr (FORM == kHinge) {
    const T on = valid && st[kHingeArg] > T(0) ? g : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) gp[k] = static_cast<S>(kept(pm, k) ? -on : T(0));
    for (int64_t k = lane; k < a.kn; k += kWarp) gn[k] = static_cast<S>(kept(nm, k) ? on : T(0));
  } else if constexpr (FORM == kInfoNCE) {
    const T C = st[kNceShift] + st[kNceLogSum], coef = valid ? g / st[kNceNPos] : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = C - a.cfg.beta * static_cast<T>(p[k]);
      gp[k] = static_cast<S>(valid && kept(pm, k) ? -coef * a.cfg.beta * sigmoid_d(x) : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T w = weight(a.cfg.beta * static_cast<T>(n[k]), st[kNceShift], st[kNceLogSum]);
      gn[k] = static_cast<S>(valid && kept(nm, k) ? coef * st[kNceSigmoidSum] * a.cfg.beta * w : T(0));
    }
  } else {
    const T coef = valid ? g * a.cfg.inv_beta * sigmoid_d(st[kPosShift] + st[kPosLogSum] + st[kNegShift] + st[kNegLogSum]) : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = static_cast<T>(p[k]);
      const T v = coef * weight(expo<FORM, true>(a.cfg, x), st[kPosShift], st[kPosLogSum]) * expo_d1<FORM, true>(a.cfg, x);
      gp[k] = static_cast<S>(valid && kept(pm, k) ? v : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T x = static_cast<T>(n[k]);
      const T v = coef * weight(expo<FORM, false>(a.cfg, x), st[kNegShift], st[kNegLogSum]) * expo_d1<FORM, false>(a.cfg, x);
      gn[k] = static_cast<S>(valid && kept(nm, k) ? v : T(0));
    }
  }
}

// Double backward, the formulas of csrc/oucl_rows.inc (double_backward_rows, infonce_double_backward_rows).
template <int FORM, typename S, typename T>
__global__ void double_backward_kernel(Args<S, T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const S *p = a.pos + i * a.kp, *n = a.neg + i * a.kn;
  const bool *pm = row_mask(a.pos_mask, i, a.kp), *nm = row_mask(a.neg_mask, i, a.kn);
  const S* tp = a.gg_pos + i * a.kp;
  const S* tn = a.gg_neg + i * a.kn;
  const T* st = a.stats + kStats * i;
  S* hp = a.out_pos + i * a.kp;
  S* hn = a.out_neg + i * a.kn;
  const bool valid = st[kValid] != T(0);
  const T g = a.grad_rows[i];
  if (!valid || FORM == kHinge) {
    T dir = T(0);
    if (FORM == kHinge && valid && st[kHingeArg] > T(0))
      dir = masked_sum<S, T>(tn, nm, a.kn, lane) - masked_sum<S, T>(tp, pm, a.kp, lane);
    if (lane == 0) a.grad_grad_rows[i] = dir;
    for (int64_t k = lane; k < a.kp; k += kWarp) hp[k] = static_cast<S>(0);
    for (int64_t k = lane; k < a.kn; k += kWarp) hn[k] = static_cast<S>(0);
    return;
  }
  if constexpr (FORM == kInfoNCE) {
    const T beta = a.cfg.beta, n_p = st[kNceNPos], S_sig = st[kNceSigmoidSum], C = st[kNceShift] + st[kNceLogSum];
    T wt = T(0);
    for (int64_t k = lane; k < a.kn; k += kWarp)
      if (kept(nm, k)) wt += weight(beta * static_cast<T>(n[k]), st[kNceShift], st[kNceLogSum]) * static_cast<T>(tn[k]);
    wt = warp_sum(wt);
    T sig_t = T(0), dsig = T(0), dsig_t = T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      if (!kept(pm, k)) continue;
      const T x = C - beta * static_cast<T>(p[k]);
      const T s = sigmoid_d(x), ds = s * sigmoid_d(-x), t = static_cast<T>(tp[k]);
      sig_t += s * t;
      dsig += ds;
      dsig_t += ds * t;
    }
    sig_t = warp_sum(sig_t);
    dsig = warp_sum(dsig);
    dsig_t = warp_sum(dsig_t);
    if (lane == 0) a.grad_grad_rows[i] = beta / n_p * (S_sig * wt - sig_t);
    const T c = g * beta * beta / n_p, k0 = wt * dsig - dsig_t - S_sig * wt;
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = C - beta * static_cast<T>(p[k]);
      hp[k] = static_cast<S>(kept(pm, k) ? c * sigmoid_d(x) * sigmoid_d(-x) * (static_cast<T>(tp[k]) - wt) : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T w = weight(beta * static_cast<T>(n[k]), st[kNceShift], st[kNceLogSum]);
      hn[k] = static_cast<S>(kept(nm, k) ? c * w * (S_sig * static_cast<T>(tn[k]) + k0) : T(0));
    }
  } else if constexpr (FORM != kHinge) {
    const T A = st[kPosShift] + st[kPosLogSum], Cn = st[kNegShift] + st[kNegLogSum];
    const T s = sigmoid_d(A + Cn), one_minus_s = sigmoid_d(-(A + Cn));
    T ta = T(0), tb = T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      if (!kept(pm, k)) continue;
      const T x = static_cast<T>(p[k]);
      ta += weight(expo<FORM, true>(a.cfg, x), st[kPosShift], st[kPosLogSum]) * expo_d1<FORM, true>(a.cfg, x) * static_cast<T>(tp[k]);
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      if (!kept(nm, k)) continue;
      const T x = static_cast<T>(n[k]);
      tb += weight(expo<FORM, false>(a.cfg, x), st[kNegShift], st[kNegLogSum]) * expo_d1<FORM, false>(a.cfg, x) * static_cast<T>(tn[k]);
    }
    ta = warp_sum(ta);
    tb = warp_sum(tb);
    const T t = ta + tb;
    if (lane == 0) a.grad_grad_rows[i] = a.cfg.inv_beta * s * t;
    const T c1 = g * a.cfg.inv_beta * s * one_minus_s * t, c2 = g * a.cfg.inv_beta * s;
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = static_cast<T>(p[k]), tk = static_cast<T>(tp[k]);
      const T w = weight(expo<FORM, true>(a.cfg, x), st[kPosShift], st[kPosLogSum]);
      const T d1 = expo_d1<FORM, true>(a.cfg, x);
      const T h = w * d1 * c1 + c2 * w * (d1 * (d1 * tk - ta) + expo_d2<FORM, true>(a.cfg, x) * tk);
      hp[k] = static_cast<S>(kept(pm, k) ? h : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T x = static_cast<T>(n[k]), tk = static_cast<T>(tn[k]);
      const T w = weight(expo<FORM, false>(a.cfg, x), st[kNegShift], st[kNegLogSum]);
      const T d1 = expo_d1<FORM, false>(a.cfg, x);
      const T h = w * d1 * c1 + c2 * w * (d1 * (d1 * tk - tb) + expo_d2<FORM, false>(a.cfg, x) * tk);
      hn[k] = static_cast<S>(kept(nm, k) ? h : T(0));
    }
  }
}

// ------------------------------------------------------------------------------ margin statistics
// Per row: min over kept positives, max over kept negatives, with tie counts (NaN sticky, as torch.amin);
// stats (p_min, n_max, ties_p, ties_n, valid). The backward shares ∂/∂p_min, ∂/∂n_max among the ties.
template <bool MIN, typename T>
__device__ void extremum_merge(T& value, T& ties, T other, T other_ties) {
  if (other_ties == T(0) || value != value) return;
  if (ties == T(0) || other != other || (MIN ? other < value : other > value)) {
    value = other;
    ties = other_ties;
  } else if (other == value) {
    ties += other_ties;
  }
}

template <bool MIN, typename S, typename T>
__device__ void warp_extremum(const S* x, const bool* m, int64_t K, int lane, T& value, T& ties) {
  value = MIN ? std::numeric_limits<T>::infinity() : -std::numeric_limits<T>::infinity();
  ties = T(0);
  for (int64_t k = lane; k < K; k += kWarp)
    if (kept(m, k)) extremum_merge<MIN>(value, ties, static_cast<T>(x[k]), T(1));
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T ov = __shfl_xor_sync(0xffffffffu, value, o);
    const T ot = __shfl_xor_sync(0xffffffffu, ties, o);
    extremum_merge<MIN>(value, ties, ov, ot);
  }
}

template <typename S, typename T>
__global__ void margin_forward_kernel(Args<S, T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const S *p = a.pos + i * a.kp, *n = a.neg + i * a.kn;
  const bool *pm = row_mask(a.pos_mask, i, a.kp), *nm = row_mask(a.neg_mask, i, a.kn);
  T pmin, tp, nmax, tn;
  warp_extremum<true>(p, pm, a.kp, lane, pmin, tp);
  warp_extremum<false>(n, nm, a.kn, lane, nmax, tn);
  if (lane == 0) {
    T* st = a.stats + kStats * i;
    st[kPMin] = pmin;
    st[kNMax] = nmax;
    st[kTiesPos] = tp;
    st[kTiesNeg] = tn;
    st[kValid] = tp > T(0) && tn > T(0) ? T(1) : T(0);
  }
}

template <typename S, typename T>
__global__ void margin_backward_kernel(Args<S, T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const S *p = a.pos + i * a.kp, *n = a.neg + i * a.kn;
  const bool *pm = row_mask(a.pos_mask, i, a.kp), *nm = row_mask(a.neg_mask, i, a.kn);
  const T* st = a.stats + kStats * i;
  const bool valid = st[kValid] != T(0);
  const T gp = valid ? a.grad_rows[2 * i] / st[kTiesPos] : T(0), gn = valid ? a.grad_rows[2 * i + 1] / st[kTiesNeg] : T(0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const bool p_nan = st[kPMin] != st[kPMin], n_nan = st[kNMax] != st[kNMax];
  for (int64_t k = lane; k < a.kp; k += kWarp) {
    const bool keep = kept(pm, k);
    a.out_pos[i * a.kp + k] = static_cast<S>(keep && p_nan ? nan : keep && static_cast<T>(p[k]) == st[kPMin] ? gp : T(0));
  }
  for (int64_t k = lane; k < a.kn; k += kWarp) {
    const bool keep = kept(nm, k);
    a.out_neg[i * a.kn + k] = static_cast<S>(keep && n_nan ? nan : keep && static_cast<T>(n[k]) == st[kNMax] ? gn : T(0));
  }
}

enum class Pass { kForward, kBackward, kDoubleBackward };

template <typename S, typename T>
void launch(Pass pass, int64_t form, const Args<S, T>& a) {
  if (a.B == 0) return;
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid((a.B + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const cudaStream_t stream = device::current_stream();
  if (form == kMargin) {
    if (pass == Pass::kForward) device::launch(margin_forward_kernel<S, T>, grid, block, stream, a);
    else device::launch(margin_backward_kernel<S, T>, grid, block, stream, a);
    return;
  }
  with_form(form, [&](auto f) {
    constexpr int FORM = decltype(f)::value;
    if constexpr (FORM != kMargin) {
      switch (pass) {
        case Pass::kForward: device::launch(forward_kernel<FORM, S, T>, grid, block, stream, a); break;
        case Pass::kBackward: device::launch(backward_kernel<FORM, S, T>, grid, block, stream, a); break;
        case Pass::kDoubleBackward: device::launch(double_backward_kernel<FORM, S, T>, grid, block, stream, a); break;
      }
    }
  });
}

ScoreInputs prepare(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                    const c10::optional<at::Tensor>& neg_mask, int64_t form) {
  TORCH_CHECK(device::holds(pos) && device::holds(neg) && pos.device() == neg.device(),
              "oucl_score (cuda): pos and neg must be tensors on one device (", device::kName, ")");
  return score_inputs("oucl_score (cuda)", pos, neg, pos_mask, neg_mask, form);
}

template <typename S, typename T>
Args<S, T> make_args(const ScoreInputs& in, double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
  Args<S, T> a{};
  pack_score_args<S, T>(a, in, beta, gamma_pos, gamma_neg, margin, lam);
  a.B = in.pos.size(0);
  return a;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& pos, const at::Tensor& neg,
                                            const c10::optional<at::Tensor>& pos_mask,
                                            const c10::optional<at::Tensor>& neg_mask, int64_t form, double beta,
                                            double gamma_pos, double gamma_neg, double margin, double lam) {
  const ScoreInputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const device::Guard guard(pos.device());
  const auto opts = pos.options().dtype(acc_type(pos.scalar_type()));
  at::Tensor rows = at::empty({pos.size(0)}, opts), stats = at::empty({pos.size(0), kStats}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_fwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.rows = rows.data_ptr<T>();
    a.stats = stats.data_ptr<T>();
    launch(Pass::kForward, form, a);
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& pos, const at::Tensor& neg,
                                            const c10::optional<at::Tensor>& pos_mask,
                                            const c10::optional<at::Tensor>& neg_mask, const at::Tensor& stats,
                                            int64_t form, double beta, double gamma_pos, double gamma_neg,
                                            double margin, double lam) {
  const ScoreInputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const device::Guard guard(pos.device());
  TORCH_CHECK(stats.is_contiguous() && stats.size(1) == kStats, "oucl_score (cuda): stats from oucl_score_fwd");
  const at::Tensor g = grad_rows.contiguous();
  at::Tensor gp = at::empty_like(in.pos), gn = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.out_pos = gp.data_ptr<scalar_t>();
    a.out_neg = gn.data_ptr<scalar_t>();
    launch(Pass::kBackward, form, a);
  });
  return {gp, gn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& gg_pos, const at::Tensor& gg_neg, const at::Tensor& pos,
    const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask, const c10::optional<at::Tensor>& neg_mask,
    const at::Tensor& stats, int64_t form, double beta, double gamma_pos, double gamma_neg, double margin,
    double lam) {
  const ScoreInputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const device::Guard guard(pos.device());
  TORCH_CHECK(stats.is_contiguous() && stats.size(1) == kStats, "oucl_score (cuda): stats from oucl_score_fwd");
  const at::Tensor g = grad_rows.contiguous(), tp = gg_pos.contiguous(), tn = gg_neg.contiguous();
  at::Tensor ggo = at::empty_like(g), hp = at::empty_like(in.pos), hn = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.gg_pos = tp.data_ptr<scalar_t>();
    a.gg_neg = tn.data_ptr<scalar_t>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.grad_grad_rows = ggo.data_ptr<T>();
    a.out_pos = hp.data_ptr<scalar_t>();
    a.out_neg = hn.data_ptr<scalar_t>();
    launch(Pass::kDoubleBackward, form, a);
  });
  return {ggo, hp, hn};
}

at::Tensor margin_fwd_cuda(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                           const c10::optional<at::Tensor>& neg_mask) {
  const ScoreInputs in = prepare(pos, neg, pos_mask, neg_mask, kMargin);
  const device::Guard guard(pos.device());
  at::Tensor stats = at::empty({pos.size(0), kStats}, pos.options().dtype(acc_type(pos.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "margin_score_fwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, 1.0, 0.0, 0.0, 0.0, 0.0);
    a.stats = stats.data_ptr<T>();
    launch(Pass::kForward, kMargin, a);
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> margin_bwd_cuda(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& neg,
                                                   const c10::optional<at::Tensor>& pos_mask,
                                                   const c10::optional<at::Tensor>& neg_mask, const at::Tensor& stats) {
  const ScoreInputs in = prepare(pos, neg, pos_mask, neg_mask, kMargin);
  const device::Guard guard(pos.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == 2 && stats.size(1) == kStats, "margin_score (cuda): grad [B,2]");
  const at::Tensor g = grad.contiguous();
  at::Tensor gp = at::empty_like(in.pos), gn = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "margin_score_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, 1.0, 0.0, 0.0, 0.0, 0.0);
    a.grad_rows = g.data_ptr<T>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.out_pos = gp.data_ptr<scalar_t>();
    a.out_neg = gn.data_ptr<scalar_t>();
    launch(Pass::kBackward, kMargin, a);
  });
  return {gp, gn};
}


// ------------------------------------------------------------------------------------------ label mode
// The CPU design on the GPU: column tiles of S = zn · rn[cols]ᵀ from cuBLAS (at::mm), each consumed by a
// fused epilogue kernel that merges the tile into per-row running state (one warp per row; tiles run in
// order on one stream, so every row has one writer); B×M is never stored, only B × tile. Backward
// recomputes each tile, turns it into G = ∂ℓ/∂S in place (elementwise kernel) and accumulates G·rn and
// Gᵀ·zn with cuBLAS. State per row (kState values): LSE⁺ (shift, log_sum), LSE⁻ (shift, log_sum),
// sum⁺, sum⁻, min⁺, ties⁺, max⁻, ties⁻, n⁺, n⁻ -- the fields of the CPU RowState. InfoNCE's second sweep
// keeps Σ softplus(C - βs) and Σ σ(C - βs) in the sums' slots.
enum LabelState : int {
  kLsePosShift, kLsePosLogSum, kLseNegShift, kLseNegLogSum, kSumPos, kSumNeg, kMinPos, kMinPosTies, kMaxNeg,
  kMaxNegTies, kCountPos, kCountNeg, kState,
  kSoftplusSum = kSumPos, kSigmoidSum = kSumNeg,
};

template <typename T>
struct LabelArgsD {
  Cfg<T> cfg;
  T sim_a, sim_b;
  bool exclude_self;
  int64_t self_offset;
  const int64_t* labels;
  const int64_t* ref_labels;
  int64_t B, c0, L;
  T* tile;        // [B, L]
  T* state;       // [B, kState]
  const T* stats;  // [B, kStats] (backward)
  const T* grad;   // [B] or [B, 2] (margins) (backward)
  int sweep;       // InfoNCE: 0 = negatives' LSE, 1 = positives' terms
};

template <typename T>
__device__ void lse_merge_d(T& shift, T& log_sum, T o_shift, T o_log_sum) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (o_log_sum == ninf) return;
  if (log_sum == ninf) {
    shift = o_shift;
    log_sum = o_log_sum;
    return;
  }
  const T m = shift > o_shift ? shift : o_shift;
  log_sum = log(exp(shift - m + log_sum) + exp(o_shift - m + o_log_sum));
  shift = m;
}

template <bool MIN, typename T>
__device__ void warp_extremum_merge(T& value, T& ties) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T ov = __shfl_xor_sync(0xffffffffu, value, o);
    const T ot = __shfl_xor_sync(0xffffffffu, ties, o);
    extremum_merge<MIN>(value, ties, ov, ot);
  }
}

template <int FORM, typename T>
__global__ void label_tile_forward_kernel(LabelArgsD<T> a) {
  const int64_t i = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= a.B) return;
  const int64_t li = a.labels[i];
  const T* s = a.tile + i * a.L;
  T* st = a.state + kState * i;
  Running<T> rp, rn;
  T sp = T(0), sn = T(0), np = T(0), nn = T(0);
  T mn = std::numeric_limits<T>::infinity(), tmn = T(0), mx = -std::numeric_limits<T>::infinity(), tmx = T(0);
  const T C = FORM == kInfoNCE && a.sweep == 1 ? st[kLseNegShift] + st[kLseNegLogSum] : T(0);
  for (int64_t k = lane; k < a.L; k += kWarp) {
    const int64_t j = a.c0 + k;
    if (a.exclude_self && j == i + a.self_offset) continue;
    const T x = a.sim_a * s[k] + a.sim_b;
    const bool pos = a.ref_labels[j] == li;
    np += pos ? T(1) : T(0);
    nn += pos ? T(0) : T(1);
    if constexpr (FORM == kMargin) {
      if (pos) extremum_merge<true>(mn, tmn, x, T(1));
      else extremum_merge<false>(mx, tmx, x, T(1));
    } else if constexpr (FORM == kHinge) {
      (pos ? sp : sn) += x;
    } else if constexpr (FORM == kInfoNCE) {
      if (a.sweep == 0 && !pos) rn.add(a.cfg.beta * x);
      if (a.sweep == 1 && pos) {
        const T y = C - a.cfg.beta * x;
        sp += softplus_d(y);
        sn += sigmoid_d(y);
      }
    } else {
      if (pos) rp.add(Terms<FORM, T>::u(a.cfg, x));
      else rn.add(Terms<FORM, T>::v(a.cfg, x));
    }
  }
  T ps, pl, ns, nl;
  warp_lse(rp, ps, pl);
  warp_lse(rn, ns, nl);
  sp = warp_sum(sp);
  sn = warp_sum(sn);
  np = warp_sum(np);
  nn = warp_sum(nn);
  warp_extremum_merge<true>(mn, tmn);
  warp_extremum_merge<false>(mx, tmx);
  if (lane != 0) return;
  if (FORM == kInfoNCE && a.sweep == 1) {
    st[kSoftplusSum] += sp;
    st[kSigmoidSum] += sn;
    return;
  }
  lse_merge_d(st[kLsePosShift], st[kLsePosLogSum], ps, pl);
  lse_merge_d(st[kLseNegShift], st[kLseNegLogSum], ns, nl);
  st[kSumPos] += sp;
  st[kSumNeg] += sn;
  extremum_merge<true>(st[kMinPos], st[kMinPosTies], mn, tmn);
  extremum_merge<false>(st[kMaxNeg], st[kMaxNegTies], mx, tmx);
  st[kCountPos] += np;
  st[kCountNeg] += nn;
}

// Row results from the state, as the CPU's finalization: rows [B] and stats [B, kStats].
template <typename T>
__global__ void label_finalize_kernel(const T* state, int64_t B, int64_t form, Cfg<T> cfg, T* rows, T* stats) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const T* s = state + kState * i;
  T* st = stats + kStats * i;
  // Parts are written for invalid rows too (their loss stays 0), as on the CPU, for ring-mode callers.
  const bool valid = s[kCountPos] > T(0) && s[kCountNeg] > T(0);
  T out = T(0), v0, v1, v2, v3;
  if (form == kMargin) {
    v0 = s[kMinPos]; v1 = s[kMaxNeg]; v2 = s[kMinPosTies]; v3 = s[kMaxNegTies];
  } else if (form == kInfoNCE) {
    v0 = s[kLseNegShift]; v1 = s[kLseNegLogSum]; v2 = s[kSigmoidSum]; v3 = s[kCountPos];
    if (valid) out = s[kSoftplusSum] / s[kCountPos];
  } else if (form == kHinge) {
    v0 = s[kSumNeg] - s[kSumPos] + cfg.lam; v1 = v2 = v3 = T(0);
    if (valid) out = v0 > T(0) || v0 != v0 ? v0 : T(0);
  } else {
    v0 = s[kLsePosShift]; v1 = s[kLsePosLogSum]; v2 = s[kLseNegShift]; v3 = s[kLseNegLogSum];
    if (valid) out = softplus_d(v0 + v1 + v2 + v3) * cfg.inv_beta;
  }
  rows[i] = out;
  st[kPosShift] = v0; st[kPosLogSum] = v1; st[kNegShift] = v2; st[kNegLogSum] = v3;
  st[kValid] = valid ? T(1) : T(0);
}

// G = ∂(Σ_i grad_i ℓ_i)/∂S for the tile, in place; one thread per element.
template <int FORM, typename T>
__global__ void label_tile_backward_kernel(LabelArgsD<T> a) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= a.B * a.L) return;
  const int64_t i = idx / a.L, j = a.c0 + idx % a.L;
  const T* st = a.stats + kStats * i;
  if (st[kValid] == T(0) || (a.exclude_self && j == i + a.self_offset)) {
    a.tile[idx] = T(0);
    return;
  }
  const T x = a.sim_a * a.tile[idx] + a.sim_b;
  const bool pos = a.ref_labels[j] == a.labels[i];
  T g;
  if constexpr (FORM == kMargin) {
    g = pos ? (x == st[kPMin] ? a.grad[2 * i] / st[kTiesPos] : T(0)) : (x == st[kNMax] ? a.grad[2 * i + 1] / st[kTiesNeg] : T(0));
  } else if constexpr (FORM == kHinge) {
    const T on = st[kHingeArg] > T(0) ? a.grad[i] : T(0);
    g = pos ? -on : on;
  } else if constexpr (FORM == kInfoNCE) {
    const T e = a.cfg.beta * x, coef = a.grad[i] * a.cfg.beta / st[kNceNPos];
    g = pos ? -coef * sigmoid_d(st[kNceShift] + st[kNceLogSum] - e) : coef * st[kNceSigmoidSum] * exp((e - st[kNceShift]) - st[kNceLogSum]);
  } else {
    const T coef = a.grad[i] * a.cfg.inv_beta * sigmoid_d(st[kPosShift] + st[kPosLogSum] + st[kNegShift] + st[kNegLogSum]);
    const T e = pos ? Terms<FORM, T>::u(a.cfg, x) : Terms<FORM, T>::v(a.cfg, x);
    const T d1 = pos ? Terms<FORM, T>::du(a.cfg, x) : Terms<FORM, T>::dv(a.cfg, x);
    g = coef * d1 * (pos ? exp((e - st[kPosShift]) - st[kPosLogSum]) : exp((e - st[kNegShift]) - st[kNegLogSum]));
  }
  a.tile[idx] = a.sim_a * g;
}

// Columns per tile: B × tile stays under kTileElems elements. The SIMT emulation sets a small value so that
// its small tests cross several tiles and a ragged last one.
#ifndef METAUG_LABEL_TILE_ELEMS
#define METAUG_LABEL_TILE_ELEMS (int64_t(1) << 25)
#endif
constexpr int64_t kTileElems = METAUG_LABEL_TILE_ELEMS;

template <typename T>
LabelArgsD<T> label_args(const at::Tensor& labels, const at::Tensor& ref_labels, int64_t self_offset, int64_t similarity,
                         double beta, double gamma_pos, double gamma_neg, double margin, double lam, int64_t B) {
  LabelArgsD<T> a{};
  a.cfg = make_cfg<T>(beta, gamma_pos, gamma_neg, margin, lam);
  a.sim_a = similarity == kShiftedCosine ? T(0.5) : T(1);
  a.sim_b = similarity == kShiftedCosine ? T(0.5) : T(0);
  a.exclude_self = self_offset >= 0;
  a.self_offset = self_offset;
  a.labels = labels.data_ptr<int64_t>();
  a.ref_labels = ref_labels.data_ptr<int64_t>();
  a.B = B;
  return a;
}

template <typename T>
void launch_label_forward(int64_t form, const LabelArgsD<T>& a, cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock), grid((a.B + kWarpsPerBlock - 1) / kWarpsPerBlock);
  with_form(form, [&](auto f) { device::launch(label_tile_forward_kernel<decltype(f)::value, T>, grid, block, stream, a); });
}

template <typename T>
void launch_label_backward(int64_t form, const LabelArgsD<T>& a, cudaStream_t stream) {
  const int64_t n = a.B * a.L;
  const dim3 block(256), grid((n + 255) / 256);
  with_form(form, [&](auto f) { device::launch(label_tile_backward_kernel<decltype(f)::value, T>, grid, block, stream, a); });
}

void check_label_cuda(const at::Tensor& zn, const at::Tensor& rn, const at::Tensor& labels,
                      const at::Tensor& ref_labels, int64_t form) {
  TORCH_CHECK(device::holds(zn) && rn.device() == zn.device() && labels.device() == zn.device() &&
                  ref_labels.device() == zn.device(),
              "oucl_label (cuda): all tensors on one device (", device::kName, ")");
  TORCH_CHECK(zn.dim() == 2 && rn.dim() == 2 && zn.size(1) == rn.size(1), "oucl_label (cuda): zn [B,D], rn [M,D]");
  TORCH_CHECK(zn.scalar_type() == rn.scalar_type() &&
                  (zn.scalar_type() == at::kFloat || zn.scalar_type() == at::kDouble),
              "oucl_label (cuda): zn and rn must both be float32 or both float64");
  TORCH_CHECK(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong &&
                  labels.numel() == zn.size(0) && ref_labels.numel() == rn.size(0),
              "oucl_label (cuda): labels [B] and ref_labels [M] must be int64");
  TORCH_CHECK(is_form(form), "oucl_label (cuda): unknown form id ", form);
}

// The label ops' common prologue, alive for the op's whole body: inputs checked, the device guard, autograd
// off for the internal GEMMs (it would keep every tile alive), and detached contiguous inputs.
struct LabelInputs {
  LabelInputs(const at::Tensor& zn_in, const at::Tensor& rn_in, const at::Tensor& labels_in,
              const at::Tensor& ref_labels_in, int64_t form)
      : guard((check_label_cuda(zn_in, rn_in, labels_in, ref_labels_in, form), zn_in.device())),
        zn(zn_in.detach().contiguous()),
        rn(rn_in.detach().contiguous()),
        labels(labels_in.contiguous()),
        ref_labels(ref_labels_in.contiguous()) {}
  const device::Guard guard;
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor zn, rn, labels, ref_labels;
};

std::tuple<at::Tensor, at::Tensor> label_fwd_cuda(const at::Tensor& zn_in, const at::Tensor& rn_in,
                                                  const at::Tensor& labels_in, const at::Tensor& ref_labels_in,
                                                  int64_t self_offset, int64_t similarity, int64_t form, double beta,
                                                  double gamma_pos, double gamma_neg, double margin, double lam) {
  const LabelInputs in(zn_in, rn_in, labels_in, ref_labels_in, form);
  const at::Tensor &zn = in.zn, &rn = in.rn, &labels = in.labels, &ref_labels = in.ref_labels;
  const int64_t B = zn.size(0), M = rn.size(0);
  at::Tensor rows = at::empty({B}, zn.options()), stats = at::empty({B, kStats}, zn.options());
  if (B == 0) return {rows, stats};
  // Empty LSEs (log_sum = -inf), min⁺ = +inf, max⁻ = -inf, everything else 0.
  at::Tensor state = at::zeros({B, kState}, zn.options());
  state.select(1, kLsePosLogSum).fill_(-std::numeric_limits<double>::infinity());
  state.select(1, kLseNegLogSum).fill_(-std::numeric_limits<double>::infinity());
  state.select(1, kMinPos).fill_(std::numeric_limits<double>::infinity());
  state.select(1, kMaxNeg).fill_(-std::numeric_limits<double>::infinity());
  const int64_t tile_cols = std::max<int64_t>(1, std::min<int64_t>(M, kTileElems / std::max<int64_t>(B, 1)));
  const cudaStream_t stream = device::current_stream();
  AT_DISPATCH_FLOATING_TYPES(zn.scalar_type(), "oucl_label_fwd_cuda", [&] {
    using T = scalar_t;
    auto a = label_args<T>(labels, ref_labels, self_offset, similarity, beta, gamma_pos, gamma_neg, margin, lam, B);
    a.state = state.data_ptr<T>();
    for (int sweep = 0; sweep < (form == kInfoNCE ? 2 : 1); ++sweep) {
      a.sweep = sweep;
      for (int64_t c0 = 0; c0 < M; c0 += tile_cols) {
        a.c0 = c0;
        a.L = std::min(tile_cols, M - c0);
        at::Tensor tile = at::mm(zn, rn.narrow(0, c0, a.L).t()).contiguous();
        a.tile = tile.data_ptr<T>();
        launch_label_forward<T>(form, a, stream);
      }
    }
    device::launch(label_finalize_kernel<T>, dim3((B + 255) / 256), dim3(256), stream, a.state, B, form, a.cfg,
                   rows.data_ptr<T>(), stats.data_ptr<T>());
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> label_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& zn_in,
                                                  const at::Tensor& rn_in, const at::Tensor& labels_in,
                                                  const at::Tensor& ref_labels_in, const at::Tensor& stats_in,
                                                  int64_t self_offset, int64_t similarity, int64_t form, double beta,
                                                  double gamma_pos, double gamma_neg, double margin, double lam,
                                                  bool ref_grad) {
  const LabelInputs in(zn_in, rn_in, labels_in, ref_labels_in, form);
  const at::Tensor &zn = in.zn, &rn = in.rn, &labels = in.labels, &ref_labels = in.ref_labels;
  const at::Tensor stats = stats_in.contiguous(), g = grad_rows.contiguous();
  const int64_t B = zn.size(0), M = rn.size(0);
  TORCH_CHECK(stats.size(0) == B && stats.size(1) == kStats, "oucl_label (cuda): stats from oucl_label_fwd");
  // ref_grad = false (a constant reference set): ∂/∂rn is a [0, D] tensor and its GEMMs are skipped.
  at::Tensor gz = at::zeros_like(zn), gr = ref_grad ? at::zeros_like(rn) : at::zeros({0, rn.size(1)}, rn.options());
  if (B == 0 || M == 0) return {gz, gr};
  const int64_t tile_cols = std::max<int64_t>(1, std::min<int64_t>(M, kTileElems / B));
  const cudaStream_t stream = device::current_stream();
  AT_DISPATCH_FLOATING_TYPES(zn.scalar_type(), "oucl_label_bwd_cuda", [&] {
    using T = scalar_t;
    auto a = label_args<T>(labels, ref_labels, self_offset, similarity, beta, gamma_pos, gamma_neg, margin, lam, B);
    a.stats = stats.data_ptr<T>();
    a.grad = g.data_ptr<T>();
    for (int64_t c0 = 0; c0 < M; c0 += tile_cols) {
      a.c0 = c0;
      a.L = std::min(tile_cols, M - c0);
      const at::Tensor rtile = rn.narrow(0, c0, a.L);
      at::Tensor tile = at::mm(zn, rtile.t()).contiguous();
      a.tile = tile.data_ptr<T>();
      launch_label_backward<T>(form, a, stream);
      gz.addmm_(tile, rtile);
      if (ref_grad) gr.narrow(0, c0, a.L).addmm_(tile.t(), zn);
    }
  });
  return {gz, gr};
}

// The CUDA kernels of the ops whose schemas define_kernel_ops gives.
void impl_kernel_ops(torch::Library& m) {
  m.impl("oucl_score_fwd", &fwd_cuda);
  m.impl("oucl_score_bwd", &bwd_cuda);
  m.impl("oucl_score_bwd_bwd", &bwd_bwd_cuda);
  m.impl("margin_score_fwd", &margin_fwd_cuda);
  m.impl("margin_score_bwd", &margin_bwd_cuda);
  m.impl("oucl_label_fwd", &label_fwd_cuda);
  m.impl("oucl_label_bwd", &label_bwd_cuda);
}

}  // namespace

#ifndef METAUG_SIMT_EMULATION
// The schemas are defined by the CPU library (csrc/oucl_cpu.cpp), which metaug_fast loads first.
TORCH_LIBRARY_IMPL(metaug_fast, CUDA, m) { impl_kernel_ops(m); }
#endif

}  // namespace metaug_fast
