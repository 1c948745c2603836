// Score-mode OUCL, InfoNCE and margin statistics on CUDA: the same ops as the CPU kernels (torch.ops.metaug_fast.oucl_score_*),
// registered for the CUDA dispatch key, so the autograd Functions in metaug_fast/_ops/oucl_score.py run
// unchanged on CUDA tensors. One warp per row: each lane streams a strided slice of the row keeping its own
// running (max, sum) for both log-sum-exps, and the warp merges them with shuffles. fp32/fp16/bf16 inputs
// accumulate in fp32, fp64 in fp64. Stats layout and formulas are those of csrc/oucl_rows.inc.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../oucl_common.h"

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
    st[0] = s0;
    st[1] = s1;
    st[2] = s2;
    st[3] = s3;
    st[4] = valid ? T(1) : T(0);
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
  const bool valid = st[4] != T(0);
  const T g = a.grad_rows[i];
  if constexpr (FORM == kHinge) {
    const T on = valid && st[0] > T(0) ? g : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) gp[k] = static_cast<S>(kept(pm, k) ? -on : T(0));
    for (int64_t k = lane; k < a.kn; k += kWarp) gn[k] = static_cast<S>(kept(nm, k) ? on : T(0));
  } else if constexpr (FORM == kInfoNCE) {
    const T C = st[0] + st[1], coef = valid ? g / st[3] : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = C - a.cfg.beta * static_cast<T>(p[k]);
      gp[k] = static_cast<S>(valid && kept(pm, k) ? -coef * a.cfg.beta * sigmoid_d(x) : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T w = weight(a.cfg.beta * static_cast<T>(n[k]), st[0], st[1]);
      gn[k] = static_cast<S>(valid && kept(nm, k) ? coef * st[2] * a.cfg.beta * w : T(0));
    }
  } else {
    const T coef = valid ? g * a.cfg.inv_beta * sigmoid_d(st[0] + st[1] + st[2] + st[3]) : T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = static_cast<T>(p[k]);
      const T v = coef * weight(expo<FORM, true>(a.cfg, x), st[0], st[1]) * expo_d1<FORM, true>(a.cfg, x);
      gp[k] = static_cast<S>(valid && kept(pm, k) ? v : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T x = static_cast<T>(n[k]);
      const T v = coef * weight(expo<FORM, false>(a.cfg, x), st[2], st[3]) * expo_d1<FORM, false>(a.cfg, x);
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
  const bool valid = st[4] != T(0);
  const T g = a.grad_rows[i];
  if (!valid || FORM == kHinge) {
    T dir = T(0);
    if (FORM == kHinge && valid && st[0] > T(0))
      dir = masked_sum<S, T>(tn, nm, a.kn, lane) - masked_sum<S, T>(tp, pm, a.kp, lane);
    if (lane == 0) a.grad_grad_rows[i] = dir;
    for (int64_t k = lane; k < a.kp; k += kWarp) hp[k] = static_cast<S>(0);
    for (int64_t k = lane; k < a.kn; k += kWarp) hn[k] = static_cast<S>(0);
    return;
  }
  if constexpr (FORM == kInfoNCE) {
    const T beta = a.cfg.beta, n_p = st[3], S_sig = st[2], C = st[0] + st[1];
    T wt = T(0);
    for (int64_t k = lane; k < a.kn; k += kWarp)
      if (kept(nm, k)) wt += weight(beta * static_cast<T>(n[k]), st[0], st[1]) * static_cast<T>(tn[k]);
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
      const T w = weight(beta * static_cast<T>(n[k]), st[0], st[1]);
      hn[k] = static_cast<S>(kept(nm, k) ? c * w * (S_sig * static_cast<T>(tn[k]) + k0) : T(0));
    }
  } else if constexpr (FORM != kHinge) {
    const T A = st[0] + st[1], Cn = st[2] + st[3];
    const T s = sigmoid_d(A + Cn), one_minus_s = sigmoid_d(-(A + Cn));
    T ta = T(0), tb = T(0);
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      if (!kept(pm, k)) continue;
      const T x = static_cast<T>(p[k]);
      ta += weight(expo<FORM, true>(a.cfg, x), st[0], st[1]) * expo_d1<FORM, true>(a.cfg, x) * static_cast<T>(tp[k]);
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      if (!kept(nm, k)) continue;
      const T x = static_cast<T>(n[k]);
      tb += weight(expo<FORM, false>(a.cfg, x), st[2], st[3]) * expo_d1<FORM, false>(a.cfg, x) * static_cast<T>(tn[k]);
    }
    ta = warp_sum(ta);
    tb = warp_sum(tb);
    const T t = ta + tb;
    if (lane == 0) a.grad_grad_rows[i] = a.cfg.inv_beta * s * t;
    const T c1 = g * a.cfg.inv_beta * s * one_minus_s * t, c2 = g * a.cfg.inv_beta * s;
    for (int64_t k = lane; k < a.kp; k += kWarp) {
      const T x = static_cast<T>(p[k]), tk = static_cast<T>(tp[k]);
      const T w = weight(expo<FORM, true>(a.cfg, x), st[0], st[1]);
      const T d1 = expo_d1<FORM, true>(a.cfg, x);
      const T h = w * d1 * c1 + c2 * w * (d1 * (d1 * tk - ta) + expo_d2<FORM, true>(a.cfg, x) * tk);
      hp[k] = static_cast<S>(kept(pm, k) ? h : T(0));
    }
    for (int64_t k = lane; k < a.kn; k += kWarp) {
      const T x = static_cast<T>(n[k]), tk = static_cast<T>(tn[k]);
      const T w = weight(expo<FORM, false>(a.cfg, x), st[2], st[3]);
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
    st[0] = pmin;
    st[1] = nmax;
    st[2] = tp;
    st[3] = tn;
    st[4] = tp > T(0) && tn > T(0) ? T(1) : T(0);
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
  const bool valid = st[4] != T(0);
  const T gp = valid ? a.grad_rows[2 * i] / st[2] : T(0), gn = valid ? a.grad_rows[2 * i + 1] / st[3] : T(0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const bool p_nan = st[0] != st[0], n_nan = st[1] != st[1];
  for (int64_t k = lane; k < a.kp; k += kWarp) {
    const bool keep = kept(pm, k);
    a.out_pos[i * a.kp + k] = static_cast<S>(keep && p_nan ? nan : keep && static_cast<T>(p[k]) == st[0] ? gp : T(0));
  }
  for (int64_t k = lane; k < a.kn; k += kWarp) {
    const bool keep = kept(nm, k);
    a.out_neg[i * a.kn + k] = static_cast<S>(keep && n_nan ? nan : keep && static_cast<T>(n[k]) == st[1] ? gn : T(0));
  }
}

enum class Pass { kForward, kBackward, kDoubleBackward };

template <typename S, typename T>
void launch(Pass pass, int64_t form, const Args<S, T>& a) {
  if (a.B == 0) return;
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid((a.B + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
#define METAUG_CUDA_FORM(FORM)                                                                      \
  switch (pass) {                                                                                   \
    case Pass::kForward: forward_kernel<FORM, S, T><<<grid, block, 0, stream>>>(a); break;          \
    case Pass::kBackward: backward_kernel<FORM, S, T><<<grid, block, 0, stream>>>(a); break;        \
    case Pass::kDoubleBackward: double_backward_kernel<FORM, S, T><<<grid, block, 0, stream>>>(a); break; \
  }
  if (form == kMargin) {
    if (pass == Pass::kForward) margin_forward_kernel<S, T><<<grid, block, 0, stream>>>(a);
    else margin_backward_kernel<S, T><<<grid, block, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  switch (form) {
    case kHinge: METAUG_CUDA_FORM(kHinge) break;
    case kSquared: METAUG_CUDA_FORM(kSquared) break;
    case kWeighted: METAUG_CUDA_FORM(kWeighted) break;
    case kCircle: METAUG_CUDA_FORM(kCircle) break;
    case kInfoNCE: METAUG_CUDA_FORM(kInfoNCE) break;
  }
#undef METAUG_CUDA_FORM
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor pos, neg, pos_mask, neg_mask;
};

Inputs prepare(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
               const c10::optional<at::Tensor>& neg_mask, int64_t form) {
  TORCH_CHECK(pos.is_cuda() && neg.is_cuda() && pos.device() == neg.device(),
              "oucl_score (cuda): pos and neg must be CUDA tensors on one device");
  TORCH_CHECK(pos.dim() == 2 && neg.dim() == 2 && pos.size(0) == neg.size(0),
              "oucl_score (cuda): pos [B,K+] and neg [B,K-]");
  TORCH_CHECK(pos.scalar_type() == neg.scalar_type(), "oucl_score (cuda): pos and neg must have one dtype");
  TORCH_CHECK(form >= kHinge && form <= kMargin, "oucl_score (cuda): unknown form id ", form);
  Inputs in{pos.contiguous(), neg.contiguous(), at::Tensor(), at::Tensor()};
  if (pos_mask.has_value()) {
    TORCH_CHECK(pos_mask->scalar_type() == at::kBool && pos_mask->sizes() == pos.sizes(), "oucl_score (cuda): pos_mask");
    in.pos_mask = pos_mask->contiguous();
  }
  if (neg_mask.has_value()) {
    TORCH_CHECK(neg_mask->scalar_type() == at::kBool && neg_mask->sizes() == neg.sizes(), "oucl_score (cuda): neg_mask");
    in.neg_mask = neg_mask->contiguous();
  }
  return in;
}

template <typename S, typename T>
Args<S, T> make_args(const Inputs& in, double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
  Args<S, T> a{};
  a.cfg = Cfg<T>{T(beta), T(1.0 / beta), T(gamma_pos), T(gamma_neg), T(margin), T(lam)};
  a.B = in.pos.size(0);
  a.kp = in.pos.size(1);
  a.kn = in.neg.size(1);
  a.pos = in.pos.data_ptr<S>();
  a.neg = in.neg.data_ptr<S>();
  a.pos_mask = in.pos_mask.defined() ? in.pos_mask.data_ptr<bool>() : nullptr;
  a.neg_mask = in.neg_mask.defined() ? in.neg_mask.data_ptr<bool>() : nullptr;
  return a;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& pos, const at::Tensor& neg,
                                            const c10::optional<at::Tensor>& pos_mask,
                                            const c10::optional<at::Tensor>& neg_mask, int64_t form, double beta,
                                            double gamma_pos, double gamma_neg, double margin, double lam) {
  const Inputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const c10::cuda::CUDAGuard guard(pos.device());
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
  const Inputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const c10::cuda::CUDAGuard guard(pos.device());
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
  const Inputs in = prepare(pos, neg, pos_mask, neg_mask, form);
  const c10::cuda::CUDAGuard guard(pos.device());
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
  const Inputs in = prepare(pos, neg, pos_mask, neg_mask, kMargin);
  const c10::cuda::CUDAGuard guard(pos.device());
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
  const Inputs in = prepare(pos, neg, pos_mask, neg_mask, kMargin);
  const c10::cuda::CUDAGuard guard(pos.device());
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

}  // namespace

// The schemas are defined by the CPU library (csrc/oucl_cpu.cpp), which metaug_fast loads first.
TORCH_LIBRARY_IMPL(metaug_fast, CUDA, m) {
  m.impl("oucl_score_fwd", &fwd_cuda);
  m.impl("oucl_score_bwd", &bwd_cuda);
  m.impl("oucl_score_bwd_bwd", &bwd_bwd_cuda);
  m.impl("margin_score_fwd", &margin_fwd_cuda);
  m.impl("margin_score_bwd", &margin_bwd_cuda);
}

}  // namespace metaug_fast
