// The kernels of the label-mode second derivative on CUDA (oucl_label_hvp; its host is CudaLabel::hvp in
// label.cu): the CPU's two rounds (csrc/cpu/label_hvp.h, whose notation this follows) on label.cu's GEMM
// tiles of S = zn·rnᵀ and of U = v_z·rnᵀ + zn·v_rᵀ, the cotangent on the scores without the similarity's
// slope a. Round 1 adds each row's sums of U weighted by its softmax (label_hvp_sums_kernel, one warp per
// row); label_hvp_rows_kernel turns them into the row's constants and d_g; round 2 recomputes each tile
// and overwrites S with G = ∂(Σ g·ℓ)/∂S and U with a·W, W = g·H·U (label_hvp_apply_kernel, one thread per
// entry), which the host multiplies into ∂zn and ∂rn with cuBLAS. Every tile's rows take their side of
// the tile only (self mode's column side is its transposed copy, as in the first derivative), so each row
// has one writer per launch and the launches run in one order on one stream: deterministic, no atomics.
// The pair j = i + self_offset is never a positive (self_pair, as in the first-order kernels). Included by
// label.cu only, inside its namespace, after LabelTileArgs.
#pragma once

// A row's state across the rounds: the forward's log-sum-exps of its sides (InfoNCE: the negatives' in
// neg), round 1's sums (OUCL forms: Σ⁺ w·u'·U, Σ⁻ w·v'·U, w the side's softmax weight; InfoNCE: Σ⁻ w·U,
// Σ⁺ σ·U, Σ⁺ σ', Σ⁺ σ'·U, σ = σ(C - βx)), and round 2's constants from them (HvpLanes::second on the CPU).
template <typename T>
struct HvpRow {
  Lse<T> pos, neg;
  T sum[4];
  T coef, c1, sa, sb, s_sig;
  bool valid;
};

template <typename T>
struct HvpTileArgs : LabelTileArgs<T> {
  T* u;              // [B, L] the tile of U; round 2 overwrites it with a·W (tile: S, then G)
  HvpRow<T>* hrow;   // [all rows]
};

template <typename T>
__global__ void label_hvp_init_kernel(HvpRow<T>* hrow, const T* stats, int64_t B, int64_t form) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const T* st = stats + kStats * i;
  HvpRow<T> h{};
  h.valid = st[kValid] != T(0);
  if (form == kInfoNCE) {
    h.neg = stat_lse(st, kNceShift, kNceLogSum);
  } else {
    h.pos = stat_lse(st, kPosShift, kPosLogSum);
    h.neg = stat_lse(st, kNegShift, kNegLogSum);
  }
  hrow[i] = h;
}

// Round 1: the tile's part of each valid row's sums.
template <int FORM, typename T>
__global__ void label_hvp_sums_kernel(HvpTileArgs<T> a) {
  const int64_t il = warp_row(), i = a.r0 + il;
  const int lane = warp_lane();
  if (il >= a.B) return;
  HvpRow<T>& h = a.hrow[i];
  if (!h.valid) return;  // the whole warp: its row is i
  const int64_t li = a.labels[i];
  const T *s = a.tile + il * a.L, *t = a.u + il * a.L;
  T p0 = T(0), p1 = T(0), p2 = T(0), p3 = T(0);
  for (int64_t k = lane; k < a.L; k += kWarp) {
    const int64_t j = a.c0 + k;
    const bool pos = a.ref_labels[j] == li;
    if (pos && self_pair(a, i, j)) continue;
    const T x = a.sim_a * s[k] + a.sim_b, tk = t[k];
    if constexpr (FORM == kInfoNCE) {
      const T bx = a.cfg.beta * x;
      if (pos) {
        const T sg = sigmoid(h.neg.value() - bx), ds = sg * sigmoid(bx - h.neg.value());
        p1 += sg * tk;
        p2 += ds;
        p3 += ds * tk;
      } else {
        p0 += weight(bx, h.neg) * tk;
      }
    } else {
      const T e = pos ? Terms<FORM, T>::u(a.cfg, x) : Terms<FORM, T>::v(a.cfg, x);
      const T d1 = pos ? Terms<FORM, T>::du(a.cfg, x) : Terms<FORM, T>::dv(a.cfg, x);
      (pos ? p0 : p1) += weight(e, pos ? h.pos : h.neg) * d1 * tk;
    }
  }
  p0 = warp_sum(p0);
  p1 = warp_sum(p1);
  p2 = warp_sum(p2);
  p3 = warp_sum(p3);
  if (lane != 0) return;
  h.sum[0] += p0;
  h.sum[1] += p1;
  h.sum[2] += p2;
  h.sum[3] += p3;
}

// Between the rounds: each row's constants of round 2 from its whole sums, and d_g = a·∂ℓ/∂S·U (zero on
// invalid rows).
template <typename T>
__global__ void label_hvp_rows_kernel(HvpRow<T>* hrow, const T* stats, const T* grad_rows, int64_t B, int64_t form,
                                      Cfg<T> cfg, T sim_a, T* d_g) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  HvpRow<T>& h = hrow[i];
  if (!h.valid) {
    d_g[i] = T(0);
    return;
  }
  const HvpConsts<T> k =
      hvp_row_consts(form == kInfoNCE, cfg, stats + kStats * i, grad_rows[i], h.sum[0], h.sum[1], h.sum[2], h.sum[3]);
  h.coef = k.coef, h.c1 = k.c1, h.sa = k.sa, h.sb = k.sb, h.s_sig = k.s_sig;
  d_g[i] = sim_a * k.d_g;
}

// Round 2, in place: the tile's S becomes G and its U becomes a·W.
template <int FORM, typename T>
__global__ void label_hvp_apply_kernel(HvpTileArgs<T> a) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= a.B * a.L) return;
  const int64_t i = a.r0 + idx / a.L, j = a.c0 + idx % a.L;
  const HvpRow<T>& h = a.hrow[i];
  T g = T(0), w = T(0);
  const bool pos = a.ref_labels[j] == a.labels[i];
  if (h.valid && !(pos && self_pair(a, i, j))) {
    const T x = a.sim_a * a.tile[idx] + a.sim_b, tk = a.u[idx];
    if constexpr (FORM == kInfoNCE) {
      const T bx = a.cfg.beta * x;
      if (pos) {
        const T y = h.neg.value() - bx, sg = sigmoid(y);
        g = -h.coef * a.cfg.beta * sg;
        w = h.c1 * sg * sigmoid(-y) * (tk - h.sa);
      } else {
        const T wt = weight(bx, h.neg);
        g = h.coef * h.s_sig * wt * a.cfg.beta;
        w = h.c1 * wt * (h.s_sig * tk + h.sb);
      }
    } else {
      const T e = pos ? Terms<FORM, T>::u(a.cfg, x) : Terms<FORM, T>::v(a.cfg, x);
      const T d1 = pos ? Terms<FORM, T>::du(a.cfg, x) : Terms<FORM, T>::dv(a.cfg, x);
      const T d2 = pos ? Terms<FORM, T>::d2u(a.cfg, x) : Terms<FORM, T>::d2v(a.cfg, x);
      const T wt = weight(e, pos ? h.pos : h.neg);
      g = h.coef * wt * d1;
      w = wt * d1 * h.c1 + h.coef * wt * (d1 * (d1 * tk - (pos ? h.sa : h.sb)) + d2 * tk);
    }
  }
  a.tile[idx] = g;
  a.u[idx] = a.sim_a * w;
}
