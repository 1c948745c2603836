// Warp-level building blocks of the CUDA kernels (score.cu, label.cu): one warp per row, each lane
// streaming a strided slice of it and the warp merging the lanes' partial results with shuffles.
// Only collectives (__shfl_xor_sync, __any_sync) exchange values, so the SIMT emulator (simt/) runs these
// kernels unchanged.
#pragma once

#include <cstdint>
#include <limits>

#include "../oucl_common.h"
#include "device.h"

namespace metaug_fast {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

// The row of this warp and the lane within it, for launches of kWarpsPerBlock warps per block.
__device__ inline int64_t warp_row() { return (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; }
__device__ inline int warp_lane() { return threadIdx.x % kWarp; }

inline dim3 warp_grid(int64_t rows) { return dim3((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }
inline dim3 warp_block() { return dim3(kWarp * kWarpsPerBlock); }

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
__device__ Lse<T> warp_lse(Running<T> r) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T om = __shfl_xor_sync(0xffffffffu, r.m, o);
    const T os = __shfl_xor_sync(0xffffffffu, r.s, o);
    r.merge(om, os);
  }
  if (isfinite(r.m)) return {r.m, log(r.s)};
  return {T(0), r.s == T(0) ? -std::numeric_limits<T>::infinity() : log(r.s * exp(r.m))};
}

// Merges every lane's (value, ties) into the warp's running min (MIN) or max.
template <bool MIN, typename T, typename C>
__device__ void warp_extremum(T& value, C& ties) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T ov = __shfl_xor_sync(0xffffffffu, value, o);
    const C ot = __shfl_xor_sync(0xffffffffu, ties, o);
    merge_extremum<MIN>(value, ties, ov, ot);
  }
}

__device__ inline bool kept(const bool* m, int64_t k) { return m == nullptr || m[k]; }

__device__ inline const bool* row_mask(const bool* m, int64_t i, int64_t K) { return m ? m + i * K : nullptr; }

// Softmax weight of one entry: exp((e - shift) - log_sum).
template <typename T>
__device__ T weight(T e, Lse<T> lse) {
  return exp((e - lse.shift) - lse.log_sum);
}

}  // namespace metaug_fast
