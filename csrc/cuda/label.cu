// Label-mode ops on CUDA (oucl_label_fwd, oucl_label_bwd), the CPU design (csrc/cpu/label.cpp) on the
// GPU: column tiles of S = zn · rn[cols]ᵀ from cuBLAS (gemm.h: IEEE fp32 whatever torch's TF32 flags say),
// each consumed by a fused epilogue kernel
// that merges the tile into each row's RowState (oucl_common.h; one warp per row, tiles in order on one
// stream, so every row has one writer); B×M is never stored, only B × tile. The final states become rows
// and stats through finalize_row, the CPU's own code. Backward recomputes each tile, turns it into
// G = ∂ℓ/∂S in place (elementwise kernel) and accumulates G·rn and Gᵀ·zn with cuBLAS.
//
// Cross mode (CrossOps, InfoNCE both ways between zn and rn) reads each tile twice, as it is for zn's rows
// and through a transposed copy for rn's, and the backward forms H = G_rows + G_colsᵀ per tile.
//
// Self mode (is_self: rn is zn) computes only the square tiles (I, J ≥ I) of S = zn·znᵀ: each feeds the
// states of its rows and, through its transposed copy, of its columns; the backward forms
// H = G_IJ + G_JIᵀ and takes dZ_I += H·Z_J, dZ_J += Hᵀ·Z_I, returning the whole gradient in gz (gr stays
// zero: callers add the two). Half the similarity GEMMs and half the gradient GEMMs. Every kernel and GEMM
// runs in one fixed order on one stream: deterministic, no atomics.
// Compiles as host C++ for the SIMT emulator too (see score.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "device.h"
#include "gemm.h"
#include "warp.cuh"

namespace metaug_fast {
namespace {

template <typename T>
struct LabelTileArgs : LabelArgs<T> {
  int64_t r0, B, c0, L;   // the tile's rows [r0, r0 + B) and columns [c0, c0 + L)
  T* tile;                // [B, L]
  RowState<T>* state;     // [all rows] (forward)
  const T* stats;         // [B, kStats] (backward)
  const T* grad;          // [B] or [B, 2] (margins) (backward)
  int sweep;              // InfoNCE: 0 = negatives' LSE and the counts, 1 = positives' terms
};

// Whether (i, j) is the self-pair j = i + self_offset, which is never a positive and stays a negative when
// its labels differ (as reference.py defines it).
template <typename T>
__device__ inline bool self_pair(const LabelArgs<T>& a, int64_t i, int64_t j) {
  return a.exclude_self && j == i + a.self_offset;
}

template <typename T>
__global__ void label_init_kernel(RowState<T>* state, int64_t B) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < B) state[i] = RowState<T>{};
}

template <int FORM, typename T>
__global__ void label_tile_forward_kernel(LabelTileArgs<T> a) {
  const int64_t il = warp_row(), i = a.r0 + il;
  const int lane = warp_lane();
  if (il >= a.B) return;
  const int64_t li = a.labels[i];
  const T* s = a.tile + il * a.L;
  RowState<T>& st = a.state[i];
  const bool positives_sweep = FORM == kInfoNCE && a.sweep == 1;
  const T C = positives_sweep ? st.neg.value() : T(0);
  Running<T> rp, rn;
  RowState<T> part;
  for (int64_t k = lane; k < a.L; k += kWarp) {
    const int64_t j = a.c0 + k;
    const bool pos = a.ref_labels[j] == li;
    if (pos && self_pair(a, i, j)) continue;
    const T x = a.sim_a * s[k] + a.sim_b;
    ++(pos ? part.n_pos : part.n_neg);
    if constexpr (FORM == kMargin) {
      if (pos) merge_extremum<true>(part.min_pos, part.ties_pos, x, int64_t(1));
      else merge_extremum<false>(part.max_neg, part.ties_neg, x, int64_t(1));
    } else if constexpr (FORM == kHinge) {
      (pos ? part.sum_pos : part.sum_neg) += x;
    } else if constexpr (FORM == kInfoNCE) {
      if (!positives_sweep && !pos) rn.add(a.cfg.beta * x);
      if (positives_sweep && pos) {
        const T y = C - a.cfg.beta * x;
        part.sum_pos += softplus(y);
        part.sum_neg += sigmoid(y);
      }
    } else {
      if (pos) rp.add(Terms<FORM, T>::u(a.cfg, x));
      else rn.add(Terms<FORM, T>::v(a.cfg, x));
    }
  }
  part.pos = warp_lse(rp);
  part.neg = warp_lse(rn);
  part.sum_pos = warp_sum(part.sum_pos);
  part.sum_neg = warp_sum(part.sum_neg);
  part.n_pos = warp_sum(part.n_pos);
  part.n_neg = warp_sum(part.n_neg);
  warp_extremum<true>(part.min_pos, part.ties_pos);
  warp_extremum<false>(part.max_neg, part.ties_neg);
  if (lane != 0) return;
  if (positives_sweep) {  // the counts were taken in the first sweep
    st.sum_pos += part.sum_pos;
    st.sum_neg += part.sum_neg;
  } else {
    merge_state(st, part);
  }
}

template <typename T>
__global__ void label_finalize_kernel(const RowState<T>* state, int64_t B, int64_t form, Cfg<T> cfg, T* rows, T* stats) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < B) finalize_row(state[i], form, cfg, rows[i], stats + kStats * i);
}

// G = ∂(Σ_i grad_i ℓ_i)/∂S for the tile, in place; one thread per element.
template <int FORM, typename T>
__global__ void label_tile_backward_kernel(LabelTileArgs<T> a) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= a.B * a.L) return;
  const int64_t i = a.r0 + idx / a.L, j = a.c0 + idx % a.L;
  const T* st = a.stats + kStats * i;
  const bool pos = a.ref_labels[j] == a.labels[i];
  if (st[kValid] == T(0) || (pos && self_pair(a, i, j))) {
    a.tile[idx] = T(0);
    return;
  }
  const T x = a.sim_a * a.tile[idx] + a.sim_b;
  T g;
  if constexpr (FORM == kMargin) {
    g = pos ? (x == st[kPMin] ? a.grad[2 * i] / st[kTiesPos] : T(0)) : (x == st[kNMax] ? a.grad[2 * i + 1] / st[kTiesNeg] : T(0));
  } else if constexpr (FORM == kHinge) {
    const T on = st[kHingeArg] > T(0) ? a.grad[i] : T(0);
    g = pos ? -on : on;
  } else if constexpr (FORM == kInfoNCE) {
    const Lse<T> C = stat_lse(st, kNceShift, kNceLogSum);
    const T e = a.cfg.beta * x, coef = a.grad[i] * a.cfg.beta / st[kNceNPos];
    g = pos ? -coef * sigmoid(C.value() - e) : coef * st[kNceSigmoidSum] * weight(e, C);
  } else {
    const Lse<T> A = stat_lse(st, kPosShift, kPosLogSum), C = stat_lse(st, kNegShift, kNegLogSum);
    const T coef = a.grad[i] * a.cfg.inv_beta * sigmoid(A.value() + C.value());
    const T e = pos ? Terms<FORM, T>::u(a.cfg, x) : Terms<FORM, T>::v(a.cfg, x);
    const T d1 = pos ? Terms<FORM, T>::du(a.cfg, x) : Terms<FORM, T>::dv(a.cfg, x);
    g = coef * d1 * weight(e, pos ? A : C);
  }
  a.tile[idx] = a.sim_a * g;
}

#include "label_hvp.cuh"

// Columns per tile: B × tile stays under kTileElems elements. The SIMT emulation sets a small value so that
// its small tests cross several tiles and a ragged last one.
#ifndef METAUG_LABEL_TILE_ELEMS
#define METAUG_LABEL_TILE_ELEMS (int64_t(1) << 25)
#endif
constexpr int64_t kTileElems = METAUG_LABEL_TILE_ELEMS;

int64_t tile_columns(int64_t B, int64_t M) {
  return std::max<int64_t>(1, std::min<int64_t>(M, kTileElems / std::max<int64_t>(B, 1)));
}

// Self mode's square tiles: the largest power of two whose square is at most kTileElems (4096 on a GPU).
constexpr int64_t self_tile(int64_t side = 1) { return side * side * 4 > kTileElems ? side : self_tile(side * 2); }
constexpr int64_t kSelfTile = self_tile();

// The CUDA kernels of LabelOps.
struct CudaLabel : device::Backend {
  template <typename T>
  static LabelTileArgs<T> tile_args(const LabelArgs<T>& args) {
    LabelTileArgs<T> a{};
    static_cast<LabelArgs<T>&>(a) = args;
    return a;
  }

  // The tile at rows [r0, r0 + nr), columns [c0, c0 + L) into the kernels' arguments.
  template <typename T>
  static void place(LabelTileArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, at::Tensor& tile) {
    a.r0 = r0;
    a.B = nr;
    a.c0 = c0;
    a.L = tile.size(1);
    a.tile = tile.data_ptr<T>();
  }

  // `visit(r0, nr, c0, tiles)` for every tile of the products x_k·y_kᵀ of `xy` (K pairs of row-major [B, D_k]
  // and [M, D_k] operands, tiles[k] the tile of product k, [nr, L] contiguous and the visitor's to
  // overwrite). Self mode (x_k·y_kᵀ symmetric, B = M): the square tiles (I, J ≥ I) and, off the diagonal,
  // their transposed copies as tile (J, I); otherwise row-wide tiles of tile_columns(B, M) columns.
  template <size_t K, typename Visit>
  static void sweep_products(const std::array<std::pair<at::Tensor, at::Tensor>, K>& xy, bool self, Visit&& visit) {
    const int64_t B = xy[0].first.size(0), M = xy[0].second.size(0);
    std::array<at::Tensor, K> tiles, tiles_t;
    auto products = [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
      for (size_t k = 0; k < K; ++k)
        tiles[k] = device::mm(xy[k].first.narrow(0, i0, ni), xy[k].second.narrow(0, j0, nj).t());
    };
    if (!self) {
      const int64_t cols = tile_columns(B, M);
      for (int64_t c0 = 0; c0 < M; c0 += cols) {
        products(0, B, c0, std::min(cols, M - c0));
        visit(int64_t(0), B, c0, tiles);
      }
      return;
    }
    for (int64_t i0 = 0; i0 < B; i0 += kSelfTile) {
      const int64_t ni = std::min(kSelfTile, B - i0);
      for (int64_t j0 = i0; j0 < B; j0 += kSelfTile) {
        const int64_t nj = std::min(kSelfTile, B - j0);
        products(i0, ni, j0, nj);
        for (size_t k = 0; k < K; ++k) tiles_t[k] = j0 > i0 ? tiles[k].t().contiguous() : at::Tensor();
        visit(i0, ni, j0, tiles);
        if (j0 > i0) visit(j0, nj, i0, tiles_t);
      }
    }
  }

  // sweep_products of S = zn·rnᵀ alone, as `visit(r0, nr, c0, tile)`.
  template <typename Visit>
  static void sweep(const at::Tensor& zn, const at::Tensor& rn, bool self, Visit&& visit) {
    sweep_products<1>({{{zn, rn}}}, self,
                      [&](int64_t r0, int64_t nr, int64_t c0, std::array<at::Tensor, 1>& t) { visit(r0, nr, c0, t[0]); });
  }

  template <typename T>
  static void forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& args, int64_t form, T* rows,
                      T* stats) {
    const int64_t B = zn.size(0);
    const cudaStream_t stream = device::current_stream();
    const at::Tensor state = at::empty({B * int64_t(sizeof(RowState<T>))}, zn.options().dtype(at::kByte));
    auto a = tile_args(args);
    a.state = reinterpret_cast<RowState<T>*>(state.data_ptr());
    device::launch(label_init_kernel<T>, dim3((B + 255) / 256), dim3(256), stream, a.state, B);
    for (int sweep_id = 0; sweep_id < (form == kInfoNCE ? 2 : 1); ++sweep_id) {
      a.sweep = sweep_id;
      sweep(zn, rn, is_self(zn, rn, args), [&](int64_t r0, int64_t nr, int64_t c0, at::Tensor& tile) {
        place(a, r0, nr, c0, tile);
        with_form(form, [&](auto f) {
          device::launch(label_tile_forward_kernel<decltype(f)::value, T>, warp_grid(nr), warp_block(), stream, a);
        });
      });
    }
    device::launch(label_finalize_kernel<T>, dim3((B + 255) / 256), dim3(256), stream,
                   static_cast<const RowState<T>*>(a.state), B, form, a.cfg, rows, stats);
  }

  template <typename T>
  static void backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& args, int64_t form,
                       const T* stats, const T* grad_rows, at::Tensor& gz, at::Tensor& gr) {
    const cudaStream_t stream = device::current_stream();
    const bool self = is_self(zn, rn, args);
    auto a = tile_args(args);
    a.stats = stats;
    a.grad = grad_rows;
    at::Tensor held;  // self mode: G_IJ, until its transposed tile G_JI arrives
    sweep(zn, rn, self, [&](int64_t r0, int64_t nr, int64_t c0, at::Tensor& tile) {
      place(a, r0, nr, c0, tile);
      const int64_t n = nr * a.L;
      with_form(form, [&](auto f) {
        device::launch(label_tile_backward_kernel<decltype(f)::value, T>, dim3((n + 255) / 256), dim3(256), stream, a);
      });
      if (!self) {
        device::addmm_(gz, tile, rn.narrow(0, c0, a.L));
        if (gr.size(0) > 0) device::addmm_(gr.narrow(0, c0, a.L), tile.t(), zn);
      } else if (r0 == c0) {  // diagonal: H = G_II + G_IIᵀ
        device::addmm_(gz.narrow(0, r0, nr), tile + tile.t(), zn.narrow(0, r0, nr));
      } else if (r0 < c0) {
        held = tile;
      } else {  // the transposed tile G_JI with r0 = J: H = G_IJ + G_JIᵀ, I = c0
        held.add_(tile.t());
        device::addmm_(gz.narrow(0, c0, a.L), held, zn.narrow(0, r0, nr));
        device::addmm_(gz.narrow(0, r0, nr), held.t(), zn.narrow(0, c0, a.L));
        held = at::Tensor();
      }
    });
  }

  // The second derivative (LabelOps::hvp): round 1 over the tiles of S and U adds each row's sums, the
  // rows kernel makes its constants and d_g, round 2 recomputes the tiles into G and a·W and takes
  // ∂zn += G·v_r + aW·rn and ∂rn += Gᵀ·v_z + aWᵀ·zn (dr empty: not wanted), all times a at the end. U in
  // one GEMM over 2D features ([v_z | zn]·[rn | v_r]ᵀ). Self mode (v_r is v_z, U symmetric like S): the
  // symmetric tiles, H_G = G_IJ + G_JIᵀ and H_W likewise, ∂Z_I += H_G·v_J + H_W·Z_J and
  // ∂Z_J += H_Gᵀ·v_I + H_Wᵀ·Z_I, the whole gradient in dz.
  template <typename T>
  static void hvp(const at::Tensor& zn, const at::Tensor& rn, const at::Tensor& v_z, const at::Tensor& v_r, bool self,
                  const LabelArgs<T>& args, int64_t form, const T* stats, const T* grad_rows, T* d_g, at::Tensor& dz,
                  at::Tensor& dr) {
    const int64_t B = zn.size(0);
    const cudaStream_t stream = device::current_stream();
    const bool with_r = v_r.size(0) > 0;
    const std::array<std::pair<at::Tensor, at::Tensor>, 2> xy{
        {{zn, rn}, {with_r ? at::cat({v_z, zn}, 1) : v_z, with_r ? at::cat({rn, v_r}, 1) : rn}}};
    const at::Tensor rows = at::empty({B * int64_t(sizeof(HvpRow<T>))}, zn.options().dtype(at::kByte));
    HvpTileArgs<T> a{};
    static_cast<LabelArgs<T>&>(a) = args;
    a.hrow = reinterpret_cast<HvpRow<T>*>(rows.data_ptr());
    const dim3 per_row((B + 255) / 256), block(256);
    device::launch(label_hvp_init_kernel<T>, per_row, block, stream, a.hrow, stats, B, form);
    auto place_both = [&](int64_t r0, int64_t nr, int64_t c0, std::array<at::Tensor, 2>& t) {
      place(a, r0, nr, c0, t[0]);
      a.u = t[1].data_ptr<T>();
    };
    sweep_products<2>(xy, self, [&](int64_t r0, int64_t nr, int64_t c0, std::array<at::Tensor, 2>& t) {
      place_both(r0, nr, c0, t);
      with_form(form, [&](auto f) {
        if constexpr (is_hvp_form(decltype(f)::value))
          device::launch(label_hvp_sums_kernel<decltype(f)::value, T>, warp_grid(nr), warp_block(), stream, a);
      });
    });
    device::launch(label_hvp_rows_kernel<T>, per_row, block, stream, a.hrow, stats, grad_rows, B, form, args.cfg,
                   args.sim_a, d_g);
    std::array<at::Tensor, 2> held;  // self mode: G_IJ and a·W_IJ, until the transposed tile (J, I) arrives
    sweep_products<2>(xy, self, [&](int64_t r0, int64_t nr, int64_t c0, std::array<at::Tensor, 2>& t) {
      place_both(r0, nr, c0, t);
      const int64_t n = nr * a.L;
      with_form(form, [&](auto f) {
        if constexpr (is_hvp_form(decltype(f)::value))
          device::launch(label_hvp_apply_kernel<decltype(f)::value, T>, dim3((n + 255) / 256), block, stream, a);
      });
      const at::Tensor &G = t[0], &W = t[1];
      if (!self) {
        if (with_r) device::addmm_(dz, G, v_r.narrow(0, c0, a.L));
        device::addmm_(dz, W, rn.narrow(0, c0, a.L));
        if (dr.size(0) > 0) {
          device::addmm_(dr.narrow(0, c0, a.L), G.t(), v_z);
          device::addmm_(dr.narrow(0, c0, a.L), W.t(), zn);
        }
      } else if (r0 == c0) {  // diagonal: H = G_II + G_IIᵀ
        device::addmm_(dz.narrow(0, r0, nr), G + G.t(), v_z.narrow(0, r0, nr));
        device::addmm_(dz.narrow(0, r0, nr), W + W.t(), zn.narrow(0, r0, nr));
      } else if (r0 < c0) {
        held = t;
      } else {  // the transposed tile (J, I) with r0 = J: H = G_IJ + G_JIᵀ, I = c0
        held[0].add_(G.t());
        held[1].add_(W.t());
        device::addmm_(dz.narrow(0, c0, a.L), held[0], v_z.narrow(0, r0, nr));
        device::addmm_(dz.narrow(0, c0, a.L), held[1], zn.narrow(0, r0, nr));
        device::addmm_(dz.narrow(0, r0, nr), held[0].t(), v_z.narrow(0, c0, a.L));
        device::addmm_(dz.narrow(0, r0, nr), held[1].t(), zn.narrow(0, c0, a.L));
        held = {};
      }
    });
    dz.mul_(args.sim_a);
    dr.mul_(args.sim_a);
  }

  // Cross mode (InfoNCE): `visit(c0, tile, tile_t)` for every column tile of S = zn·rnᵀ (the row-wide tiles
  // of sweep) with its transposed copy, whose rows are rn's rows c0 .. c0 + L against every row of zn.
  template <typename Visit>
  static void cross_sweep(const at::Tensor& zn, const at::Tensor& rn, Visit&& visit) {
    const int64_t B = zn.size(0), M = rn.size(0), cols = tile_columns(B, M);
    if (B == 0) return;
    for (int64_t c0 = 0; c0 < M; c0 += cols) {
      at::Tensor tile = device::mm(zn, rn.narrow(0, c0, std::min(cols, M - c0)).t());
      at::Tensor tile_t = tile.t().contiguous();  // made first: the kernels overwrite their tile
      visit(c0, tile, tile_t);
    }
  }

  // Cross-mode forward: the forward kernels of both directions on each tile and its transposed copy (each
  // of rn's rows sees all of zn in one tile), twice for InfoNCE's two sweeps.
  template <typename T>
  static void cross_forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& args,
                            const LabelArgs<T>& args_t, T* rows_z, T* stats_z, T* rows_r, T* stats_r) {
    const int64_t B = zn.size(0), M = rn.size(0);
    const cudaStream_t stream = device::current_stream();
    const at::Tensor states = at::empty({(B + M) * int64_t(sizeof(RowState<T>))}, zn.options().dtype(at::kByte));
    auto a = tile_args(args), a_t = tile_args(args_t);
    a.state = reinterpret_cast<RowState<T>*>(states.data_ptr());
    a_t.state = a.state + B;
    if (B + M > 0) device::launch(label_init_kernel<T>, dim3((B + M + 255) / 256), dim3(256), stream, a.state, B + M);
    for (int sweep_id = 0; sweep_id < 2; ++sweep_id) {
      a.sweep = a_t.sweep = sweep_id;
      cross_sweep(zn, rn, [&](int64_t c0, at::Tensor& tile, at::Tensor& tile_t) {
        place(a, 0, B, c0, tile);
        device::launch(label_tile_forward_kernel<kInfoNCE, T>, warp_grid(B), warp_block(), stream, a);
        place(a_t, c0, tile_t.size(0), 0, tile_t);
        device::launch(label_tile_forward_kernel<kInfoNCE, T>, warp_grid(a_t.B), warp_block(), stream, a_t);
      });
    }
    if (B > 0)
      device::launch(label_finalize_kernel<T>, dim3((B + 255) / 256), dim3(256), stream,
                     static_cast<const RowState<T>*>(a.state), B, int64_t(kInfoNCE), a.cfg, rows_z, stats_z);
    if (M > 0)
      device::launch(label_finalize_kernel<T>, dim3((M + 255) / 256), dim3(256), stream,
                     static_cast<const RowState<T>*>(a_t.state), M, int64_t(kInfoNCE), a.cfg, rows_r, stats_r);
  }

  // Cross-mode backward: G_rows on each tile, G_cols on its transposed copy, H = G_rows + G_colsᵀ,
  // dZ += H·R_tile and dR_tile += Hᵀ·Z.
  template <typename T>
  static void cross_backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& args,
                             const LabelArgs<T>& args_t, const T* stats_z, const T* grad_z, const T* stats_r,
                             const T* grad_r, at::Tensor& gz, at::Tensor& gr) {
    const int64_t B = zn.size(0);
    const cudaStream_t stream = device::current_stream();
    auto a = tile_args(args), a_t = tile_args(args_t);
    a.stats = stats_z;
    a.grad = grad_z;
    a_t.stats = stats_r;
    a_t.grad = grad_r;
    cross_sweep(zn, rn, [&](int64_t c0, at::Tensor& tile, at::Tensor& tile_t) {
      const int64_t L = tile.size(1), n = B * L;
      place(a, 0, B, c0, tile);
      device::launch(label_tile_backward_kernel<kInfoNCE, T>, dim3((n + 255) / 256), dim3(256), stream, a);
      place(a_t, c0, L, 0, tile_t);
      device::launch(label_tile_backward_kernel<kInfoNCE, T>, dim3((n + 255) / 256), dim3(256), stream, a_t);
      tile.add_(tile_t.t());
      device::addmm_(gz, tile, rn.narrow(0, c0, L));
      device::addmm_(gr.narrow(0, c0, L), tile.t(), zn);
    });
  }
};

}  // namespace

// The CUDA kernels of the label-mode ops whose schemas define_kernel_ops gives.
void impl_label_ops(torch::Library& m) {
  LabelOps<CudaLabel>::impl(m);
  LabelOps<CudaLabel>::impl_hvp(m);
  CrossOps<CudaLabel>::impl(m);
}

}  // namespace metaug_fast
