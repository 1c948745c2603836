// Label-mode ops on the CPU (oucl_label_fwd, oucl_label_bwd): OUCL, InfoNCE and margin statistics on
// normalized features zn [B,D] and rn [M,D] (zn itself without a reference set), both fp32 or fp64, formed
// from the ops' raw rows and inverse norms by oucl_host.h (LabelInputs), which also turns the gradients of zn
// and rn into those of the raw rows and inverse norms (Python differentiates the norms). self_offset >= 0:
// anchor i is reference row i + self_offset and that pair is excluded; -1: no exclusion.
//
// Work items are (block of kRowBlock rows) × (range of kColTile-column tiles): each takes an ATen GEMM
// per tile into a [rows, tile] buffer and runs the fused epilogue (label_rows.inc) on it, so memory is
// O((B + M)·D) plus one tile per thread; B×M is never stored. Backward recomputes each tile and turns it
// into G = ∂ℓ/∂S in place once, and takes G·rn and (when the reference set needs a gradient) Gᵀ·zn from
// it; every output row sums in an order fixed by the shape (no atomics, thread-count independent).
//
// Self mode (the reference rows are the anchors themselves: rn is zn, self_offset 0, the same labels) uses
// that S = zn·znᵀ is symmetric: only the tiles on and above the diagonal are computed, each feeding its rows
// and, transposed, its columns; the backward forms H = G_IJ + G_JIᵀ per tile pair and takes dZ_I += H·Z_J,
// dZ_J += Hᵀ·Z_I. Half the similarity GEMMs and half the gradient GEMMs; the whole gradient is returned
// in the first output (the second is zero: callers add the two).
//
// Cross mode (oucl_label_cross_fwd/bwd, InfoNCE) takes both directions of two sets at once, each row of zn
// against rn and each row of rn against zn (CLIP's two cross-entropies): every tile of S = zn·rnᵀ is
// multiplied once and read along its rows and along its columns (label_rows.inc: the column passes run
// across the columns, no transposed copy); the backward turns each tile into H = ∂/∂S of both directions
// in one pass and takes dZ += H·R, dR += Hᵀ·Z. Four GEMM-equivalents for both directions, where two
// label-mode calls took eight.
//
// The meta step's second derivative (the Hessian of each row's loss applied to the scores' change along a
// direction) has its own ops: oucl_label_rows_bwd_bwd on row chunks of the scores that Python cuts, and in
// self mode oucl_label_self_bwd_bwd over the symmetric tiles in two rounds (CpuLabel::self_hvp).
//
// InfoNCE's positives' terms need each row's final negative log-sum-exp, so they come after the first
// sweep: by one dot product per positive pair when positives are sparse (one or a few per anchor, the
// contrastive case), else by a second sweep. metaug_fast/_ops/label.py wraps the ops in autograd Functions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../oucl_common.h"
#include "../oucl_host.h"
#include "isa.h"

namespace metaug_fast {

// Per row, the sums of the cotangent that the second derivative's Hessian-vector product needs over the
// whole row before any entry of W (label_rows.inc, label_hvp_sums_tile); parts over a row's tiles add.
template <typename T>
struct HvpSums {
  T a = T(0), b = T(0), c = T(0), d = T(0);
  HvpSums& operator+=(const HvpSums& o) {
    a += o.a, b += o.b, c += o.c, d += o.d;
    return *this;
  }
};

// Per-anchor constants of the second derivative as its kernels read them: arrays indexed by anchor from a
// block's first row (or a tile's first column), so that a tile's column side reads them as vectors. The
// log-sum-exps' (shift, log_sum) of the positives and negatives (InfoNCE: the negatives only) and valid
// (1/0) for the first pass; for the second the coefficients of G and W and the row's whole sums
// (HvpLanes::second fills them). Invalid anchors hold zeros.
template <typename T>
struct Lanes {
  const T *pos_shift, *pos_log, *neg_shift, *neg_log, *valid, *coef, *c1, *sa, *sb, *s_sig;
};

#define METAUG_ROWS "label_rows.inc"
#include "compile_per_isa.inc"
#undef METAUG_ROWS

namespace {

constexpr int64_t kRowBlock = 256;
// The widest reference set whose whole score rows the forward with gradient finishes in one sweep, a block
// of kRowBlock rows at a time (4 MiB in fp32). Measured here (B = 1024-4096, D = 128, fp32, 2 threads): one
// sweep is 1.1-1.4x faster than forward + backward at M = 2048-4096, 5-13% slower at M = 16384 (the rows
// leave the caches and the epilogues stream them through memory, where the tiled path keeps each tile in
// L2), and slower still beyond.
constexpr int64_t kOneSweepColumns = 4096;
constexpr int64_t kColTile = 512;

// Work is cut by shape only, never by thread count, and every sum runs in a fixed order, so the result
// does not depend on how many threads run it. A batch with few row blocks (a small batch against a large
// bank) also splits the columns into kColSplits ranges so that every thread has work.
constexpr int64_t kColSplits = 8;
// The most the backward's per-range ∂/∂zn partials may take.
constexpr int64_t kPartialBytes = int64_t(1) << 27;
// InfoNCE takes its positives' scores by dot products when there are at most B·M/kSparsePositives positive
// pairs: a scattered dot costs a few times a GEMM's multiply-add per entry, and a second sweep costs B·M.
constexpr int64_t kSparsePositives = 32;

struct LabelPlan {
  int64_t B, M, row_blocks, tiles, splits;
  int64_t tile_begin(int64_t split) const { return split * tiles / splits; }
  int64_t tile_end(int64_t split) const { return (split + 1) * tiles / splits; }
};

LabelPlan make_plan(int64_t B, int64_t M) {
  LabelPlan p{B, M, (B + kRowBlock - 1) / kRowBlock, (M + kColTile - 1) / kColTile, 1};
  // At least one split: an empty reference set (M = 0, a rank's empty shard) still yields every row's state.
  if (p.row_blocks < kColSplits) p.splits = std::max<int64_t>(1, std::min<int64_t>(p.tiles, kColSplits));
  return p;
}

// Self mode: blocks of kSelfTile rows; tile (I, J), I <= J, is S_IJ = Z_I·Z_Jᵀ. Round r takes the tiles
// (I, I + r) in parallel, each the one writer of its row block I; their transposed halves, which belong to
// block I + r, are applied in a second step of the round, again one writer per block. So every row's state
// and gradient accumulate in an order fixed by the shape alone.
constexpr int64_t kSelfTile = 256;

struct SelfBlock {
  int64_t start, size;
};

inline SelfBlock self_block(int64_t I, int64_t N) { return {I * kSelfTile, std::min(kSelfTile, N - I * kSelfTile)}; }

template <typename T>
void label_forward_tile(int64_t form, const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L,
                        T* tile, RowState<T>* states) {
  METAUG_ISA_SWITCH(
    with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      for (int64_t r = 0; r < nr; ++r) {
        if constexpr (FORM == kMargin) ns::margin_label_row<T>(a, r0 + r, c0, L, tile + r * L, states[r]);
        else if constexpr (FORM == kInfoNCE) ns::infonce_label_lse_row<T>(a, r0 + r, c0, L, tile + r * L, states[r]);
        else ns::label_forward_row<FORM, T>(a, r0 + r, c0, L, tile + r * L, states[r]);
      }
    });)
}

template <typename T>
void label_backward_tile(int64_t form, const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L,
                         T* tile, const T* stats, const T* grad_rows) {
  METAUG_ISA_SWITCH(
    with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      for (int64_t r = 0; r < nr; ++r) {
        T* row = tile + r * L;
        const T* st = stats + kStats * (r0 + r);
        if constexpr (FORM == kMargin) ns::margin_label_backward_row<T>(a, r0 + r, c0, L, row, st, grad_rows + 2 * (r0 + r));
        else if constexpr (FORM == kInfoNCE) ns::infonce_label_backward_row<T>(a, r0 + r, c0, L, row, st, grad_rows[r0 + r]);
        else ns::label_backward_row<FORM, T>(a, r0 + r, c0, L, row, st, grad_rows[r0 + r]);
      }
    });)
}

// The states of n rows from `splits` partial states each ([splits, n], split-major), merged in split order.
template <typename T>
std::vector<RowState<T>> merge_partials(const std::vector<RowState<T>>& partial, int64_t splits, int64_t n) {
  std::vector<RowState<T>> merged(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t sp = 0; sp < splits; ++sp) merge_state(merged[i], partial[sp * n + i]);
  return merged;
}

// InfoNCE's second sweep's sums into the first sweep's states.
template <typename T>
void take_positive_terms(std::vector<RowState<T>>& state, const std::vector<RowState<T>>& terms) {
  for (size_t i = 0; i < state.size(); ++i) {
    state[i].sum_pos = terms[i].sum_pos;
    state[i].sum_neg = terms[i].sum_neg;
  }
}

// Cross mode's work items: row blocks cut into rsplits ranges, column tiles into csplits ranges; item
// (rs, cs) takes its row blocks in order and, in each, its column tiles in order. So the rows have one
// partial per column range and the columns one per row range, each accumulated in an order fixed by the
// shape. The plan takes kColSplits items (or every tile, when there are fewer) with the fewest partial
// rows csplits·B + rsplits·M, and fewer items while the partials would pass kPartialBytes (`row_bytes`
// per partial row).
struct CrossPlan {
  int64_t B, M, row_blocks, tiles, rsplits, csplits;
  int64_t block_begin(int64_t rs) const { return rs * row_blocks / rsplits; }
  int64_t block_end(int64_t rs) const { return (rs + 1) * row_blocks / rsplits; }
  int64_t tile_begin(int64_t cs) const { return cs * tiles / csplits; }
  int64_t tile_end(int64_t cs) const { return (cs + 1) * tiles / csplits; }
};

CrossPlan cross_plan(int64_t B, int64_t M, int64_t row_bytes) {
  CrossPlan p{B, M, (B + kRowBlock - 1) / kRowBlock, (M + kColTile - 1) / kColTile, 0, 0};
  if (p.row_blocks == 0 || p.tiles == 0) return p;
  for (int64_t items = std::min(kColSplits, p.row_blocks * p.tiles); items >= 1; items /= 2) {
    int64_t best = -1;
    for (int64_t rs = 1; rs <= std::min(p.row_blocks, items); ++rs) {
      const int64_t cs = std::min(p.tiles, (items + rs - 1) / rs);
      if (rs * cs < items) continue;
      const int64_t rows = cs * B + rs * M;
      if (best < 0 || rows < best) best = rows, p.rsplits = rs, p.csplits = cs;
    }
    if (best >= 0 && (best * row_bytes <= kPartialBytes || items == 1)) return p;
  }
  return p;
}

// The Lanes of n anchors: the first pass's from their stats, the second's by second() once their sums are
// whole.
template <typename T>
struct HvpLanes {
  std::vector<T> pos_shift, pos_log, neg_shift, neg_log, valid, coef, c1, sa, sb, s_sig;

  HvpLanes(int64_t form, int64_t n, const T* stats)
      : pos_shift(n), pos_log(n), neg_shift(n), neg_log(n), valid(n), coef(n), c1(n), sa(n), sb(n), s_sig(n) {
    for (int64_t i = 0; i < n; ++i) {
      const T* st = stats + kStats * i;
      if (st[kValid] == T(0)) continue;
      valid[i] = T(1);
      if (form == kInfoNCE) {
        neg_shift[i] = st[kNceShift], neg_log[i] = st[kNceLogSum];
      } else {
        pos_shift[i] = st[kPosShift], pos_log[i] = st[kPosLogSum];
        neg_shift[i] = st[kNegShift], neg_log[i] = st[kNegLogSum];
      }
    }
  }

  // Anchor i's second-pass constants (label_hvp_apply_tile and its InfoNCE twin say which).
  void second(int64_t form, const Cfg<T>& c, int64_t i, const T* st, T g, const HvpSums<T>& s) {
    if (valid[i] == T(0)) return;
    if (form == kInfoNCE) {
      const T n_p = st[kNceNPos], S_sig = st[kNceSigmoidSum];
      coef[i] = g / n_p, c1[i] = g * c.beta * c.beta / n_p, s_sig[i] = S_sig;
      sa[i] = s.a, sb[i] = s.a * s.c - s.d - S_sig * s.a;
      return;
    }
    const T y = stat_lse(st, kPosShift, kPosLogSum).value() + stat_lse(st, kNegShift, kNegLogSum).value();
    coef[i] = g * c.inv_beta * sigmoid(y);
    c1[i] = coef[i] * sigmoid(-y) * (s.a + s.b);  // sigmoid(-y), not 1 - sigmoid(y): no cancellation
    sa[i] = s.a, sb[i] = s.b;
  }

  Lanes<T> at(int64_t i) const {
    return {pos_shift.data() + i, pos_log.data() + i, neg_shift.data() + i, neg_log.data() + i, valid.data() + i,
            coef.data() + i, c1.data() + i, sa.data() + i, sb.data() + i, s_sig.data() + i};
  }
};

// A tile of the second derivative: rows of labels `row_labels` against columns of labels `col_labels`,
// s, t [nr, L], row r's excluded pair at column self_k0 + r (none when self_k0 < 0), the rows' and (two-way)
// the columns' Lanes.
template <typename T>
struct HvpTile {
  const int64_t *row_labels, *col_labels;
  int64_t nr, L, self_k0;
  const T *s, *t;
  Lanes<T> rows, cols;
};

// One pass of the second derivative over a tile (label_rows.inc). The first (apply false) adds the valid
// rows' parts of their sums to row_sums [nr] and, two-way, the columns' parts to col_sums [4][L]; the
// second writes G and W [nr, L] from the whole rows' sums in the Lanes (two-way: H of rows and columns).
template <typename T>
struct HvpOut {
  HvpSums<T>* row_sums;
  T *col_sums, *G, *W;
};

template <typename T>
void hvp_pass(int64_t form, const Cfg<T>& cfg, bool two_way, bool apply, const HvpTile<T>& b, const HvpOut<T>& out) {
  auto run = [&](auto two_way_c) {
    constexpr bool TWO_WAY = decltype(two_way_c)::value;
    METAUG_ISA_SWITCH(with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      if constexpr (FORM == kInfoNCE) {
        if (apply)
          ns::infonce_label_hvp_apply_tile<TWO_WAY, T>(cfg, b.row_labels, b.col_labels, b.nr, b.L, b.self_k0, b.s,
                                                       b.t, b.rows, b.cols, out.G, out.W);
        else
          ns::infonce_label_hvp_sums_tile<TWO_WAY, T>(cfg, b.row_labels, b.col_labels, b.nr, b.L, b.self_k0, b.s,
                                                      b.t, b.rows, b.cols, out.row_sums, out.col_sums);
      } else if constexpr (is_hvp_form(FORM)) {
        if (apply)
          ns::label_hvp_apply_tile<FORM, TWO_WAY, T>(cfg, b.row_labels, b.col_labels, b.nr, b.L, b.self_k0, b.s,
                                                     b.t, b.rows, b.cols, out.G, out.W);
        else
          ns::label_hvp_sums_tile<FORM, TWO_WAY, T>(cfg, b.row_labels, b.col_labels, b.nr, b.L, b.self_k0, b.s,
                                                    b.t, b.rows, b.cols, out.row_sums, out.col_sums);
      }
    });)
  };
  if (two_way)
    run(std::true_type{});
  else
    run(std::false_type{});
}

// d_g [n] = ∂ℓ/∂s · t of n rows from their whole sums, times `scale` (zero on invalid rows).
template <typename T>
void hvp_dg_rows(int64_t form, const Cfg<T>& cfg, int64_t n, const T* stats, const HvpSums<T>* sums, T scale,
                 T* d_g) {
  METAUG_ISA_SWITCH(
    with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      if constexpr (is_hvp_form(FORM)) {
        for (int64_t r = 0; r < n; ++r) {
          const T* st = stats + kStats * r;
          if (st[kValid] == T(0)) {
            d_g[r] = T(0);
          } else if constexpr (FORM == kInfoNCE) {
            d_g[r] = scale * ns::infonce_label_hvp_dg<T>(cfg, st, sums[r]);
          } else {
            d_g[r] = scale * ns::label_hvp_dg<FORM, T>(cfg, st, sums[r]);
          }
        }
      }
    });)
}

// torch.ops.metaug_fast.oucl_label_rows_bwd_bwd: the label-mode HVP's kernel on a chunk of R whole rows of
// scores s [R, M] (the similarity applied) with the cotangent t [R, M] on them, for the LSE forms and
// InfoNCE (the hinge's Hessian is zero; margins are piecewise linear): (d_g [R], G [R, M], W [R, M]) =
// (∂ℓ/∂s · t, ∂(g·ℓ)/∂s, g·H t) per row. Row r is row row0 + r of the batch (for the excluded pair
// j = i + self_offset when self_offset >= 0). Rows are independent: one thread each.
std::tuple<at::Tensor, at::Tensor, at::Tensor> label_rows_bwd_bwd(
    const at::Tensor& grad_rows, const at::Tensor& t, const at::Tensor& s, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& stats, int64_t row0, int64_t self_offset, int64_t form,
    double beta, double gamma_pos, double gamma_neg, double margin, double lam) {
  const char* who = "oucl_label_rows_bwd_bwd";
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes() && s.device().is_cpu() && t.device().is_cpu() &&
                  s.scalar_type() == t.scalar_type() &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              who, ": s and t must be CPU [R, M] tensors of one dtype, float32 or float64");
  const int64_t R = s.size(0), M = s.size(1);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({R, kStats}) && stats.scalar_type() == s.scalar_type() &&
                  grad_rows.dim() == 1 && grad_rows.size(0) == R && grad_rows.scalar_type() == s.scalar_type(),
              who, ": stats must be [R, ", kStats, "] and grad_rows [R], in the dtype of s");
  TORCH_CHECK(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong && labels.numel() == R &&
                  ref_labels.numel() == M,
              who, ": labels [R] and ref_labels [M] must be int64");
  TORCH_CHECK(is_hvp_form(form), who, ": form must be squared, weighted, circle or InfoNCE, got ", form);
  const at::Tensor sc = s.contiguous(), tc = t.contiguous(), st = stats.contiguous(), g = grad_rows.contiguous();
  const at::Tensor lab = labels.contiguous(), rlab = ref_labels.contiguous();
  at::Tensor d_g = at::empty({R}, s.options()), G = at::empty_like(sc), W = at::empty_like(sc);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "oucl_label_rows_bwd_bwd", [&] {
    const Cfg<scalar_t> cfg = make_cfg<scalar_t>(beta, gamma_pos, gamma_neg, margin, lam);
    const scalar_t* stp = st.data_ptr<scalar_t>();
    HvpLanes<scalar_t> lanes(form, R, stp);
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // both passes per row, while the row is in cache
        const HvpTile<scalar_t> row{lab.data_ptr<int64_t>() + r, rlab.data_ptr<int64_t>(), 1, M,
                                    self_offset >= 0 ? row0 + self_offset + r : -1, sc.data_ptr<scalar_t>() + r * M,
                                    tc.data_ptr<scalar_t>() + r * M, lanes.at(r), lanes.at(r)};
        HvpSums<scalar_t> sums;
        hvp_pass<scalar_t>(form, cfg, false, false, row, {&sums, nullptr, nullptr, nullptr});
        lanes.second(form, cfg, r, stp + kStats * r, g.data_ptr<scalar_t>()[r], sums);
        hvp_pass<scalar_t>(form, cfg, false, true, row,
                           {nullptr, nullptr, G.data_ptr<scalar_t>() + r * M, W.data_ptr<scalar_t>() + r * M});
        hvp_dg_rows<scalar_t>(form, cfg, 1, stp + kStats * r, &sums, scalar_t(1), d_g.data_ptr<scalar_t>() + r);
      }
    });
  });
  return {d_g, G, W};
}

// InfoNCE's second forward sweep: the positives' terms, given each row's negative log-sum-exp C.
template <typename T>
void infonce_positive_tile(const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L, const T* tile,
                           const T* C, RowState<T>* states) {
  METAUG_ISA_SWITCH(
      for (int64_t r = 0; r < nr; ++r) ns::infonce_label_pos_row<T>(a, r0 + r, c0, L, tile + r * L, C[r0 + r], states[r]);)
}

// Row i's positive columns by a stable sort of the reference labels: cols[lo_i .. hi_i), ascending.
struct PositiveIndex {
  at::Tensor keys, cols;
  PositiveIndex(const int64_t* ref_labels, int64_t M) {
    const at::Tensor labels = at::from_blob(const_cast<int64_t*>(ref_labels), {M}, at::kLong);
    std::tie(keys, cols) = at::sort(labels, /*stable=*/true, 0, /*descending=*/false);
  }
  std::pair<int64_t, int64_t> range(int64_t label) const {
    const int64_t *k = keys.data_ptr<int64_t>(), *end = k + keys.numel();
    return {std::lower_bound(k, end, label) - k, std::upper_bound(k, end, label) - k};
  }
};

template <typename T>
bool sparse_positives(const std::vector<RowState<T>>& state, int64_t M) {
  int64_t pairs = 0;
  for (const RowState<T>& st : state) pairs += st.n_pos;
  return pairs * kSparsePositives <= int64_t(state.size()) * M;
}

// InfoNCE's positives' terms of every row of zn against rn by dot products (state: the first sweep's, C
// read from it, the terms added to it).
template <typename T>
void positive_dots(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, std::vector<RowState<T>>& state) {
  const int64_t B = zn.size(0), D = zn.size(1);
  const PositiveIndex index(a.ref_labels, rn.size(0));
  const int64_t* cols = index.cols.data_ptr<int64_t>();
  const T *z = zn.data_ptr<T>(), *r = rn.data_ptr<T>();
  at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
    METAUG_ISA_SWITCH(for (int64_t i = i0; i < i1; ++i) {
      const auto span = index.range(a.labels[i]);
      ns::infonce_label_pos_dots<T>(a, i, z + i * D, r, D, cols + span.first, span.second - span.first,
                                    state[i].neg.value(), state[i]);
    })
  });
}

// The CPU kernels of LabelOps.
struct CpuLabel : CpuDevice {
  // Rectangular sweep: every (row block, column tile), columns split into plan.splits ranges; `visit(r0, nr,
  // c0, L, tile, states)` consumes a tile into per-split states, merged per row in split order.
  template <typename T, typename Visit>
  static std::vector<RowState<T>> rect_sweep(const at::Tensor& zn, const at::Tensor& rn, Visit&& visit) {
    const int64_t B = zn.size(0), M = rn.size(0);
    const LabelPlan plan = make_plan(B, M);
    std::vector<RowState<T>> partial(plan.splits * B);
    at::parallel_for(0, plan.row_blocks * plan.splits, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t rb = item / plan.splits, split = item % plan.splits;
        const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, B - r0);
        const at::Tensor zblk = zn.narrow(0, r0, nr);
        for (int64_t t = plan.tile_begin(split); t < plan.tile_end(split); ++t) {
          const int64_t c0 = t * kColTile, L = std::min(kColTile, M - c0);
          at::Tensor tile = at::mm(zblk, rn.narrow(0, c0, L).t()).contiguous();
          visit(r0, nr, c0, L, tile.data_ptr<T>(), partial.data() + split * B + r0);
        }
      }
    });
    return merge_partials(partial, plan.splits, B);
  }

  // The schedule of self mode (see kSelfTile) over N rows: in round r, `tile(bi, bj)` runs for every tile
  // (I, I + r) in parallel; then, off the diagonal, `transposed(bi, bj)` runs for every block J = I + r in
  // parallel, the one step that writes block J from the tile (I, J).
  template <typename Tile, typename Transposed>
  static void self_rounds(int64_t N, Tile&& tile, Transposed&& transposed) {
    const int64_t nb = (N + kSelfTile - 1) / kSelfTile;
    for (int64_t r = 0; r < nb; ++r) {
      at::parallel_for(0, nb - r, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t I = b0; I < b1; ++I) tile(self_block(I, N), self_block(I + r, N));
      });
      if (r == 0) continue;
      at::parallel_for(r, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t J = b0; J < b1; ++J) transposed(self_block(J - r, N), self_block(J, N));
      });
    }
  }

  // S = Z_I·Z_Jᵀ of the tile (I, J) and, off the diagonal, its transposed copy (made first: the epilogues
  // overwrite their tile).
  static std::pair<at::Tensor, at::Tensor> self_scores(const at::Tensor& zn, SelfBlock bi, SelfBlock bj) {
    at::Tensor s = at::mm(zn.narrow(0, bi.start, bi.size), zn.narrow(0, bj.start, bj.size).t()).contiguous();
    return {s, bi.start != bj.start ? s.t().contiguous() : at::Tensor()};
  }

  // Self-mode sweep: the rows of each tile into their states, its columns into a per-block buffer merged
  // in the round's second step; the same `visit` as rect_sweep.
  template <typename T, typename Visit>
  static std::vector<RowState<T>> self_sweep(const at::Tensor& zn, Visit&& visit) {
    const int64_t N = zn.size(0);
    std::vector<RowState<T>> state(N), transposed(N);
    self_rounds(
        N,
        [&](SelfBlock bi, SelfBlock bj) {
          auto [s, s_t] = self_scores(zn, bi, bj);
          visit(bi.start, bi.size, bj.start, bj.size, s.data_ptr<T>(), state.data() + bi.start);
          if (!s_t.defined()) return;
          std::fill(transposed.begin() + bj.start, transposed.begin() + bj.start + bj.size, RowState<T>{});
          visit(bj.start, bj.size, bi.start, bi.size, s_t.data_ptr<T>(), transposed.data() + bj.start);
        },
        [&](SelfBlock, SelfBlock bj) {
          for (int64_t i = bj.start; i < bj.start + bj.size; ++i) merge_state(state[i], transposed[i]);
        });
    return state;
  }

  template <typename T>
  static void forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form, T* rows,
                      T* stats) {
    const int64_t B = zn.size(0);
    const bool self = is_self(zn, rn, a);
    auto sweep = [&](auto&& visit) { return self ? self_sweep<T>(zn, visit) : rect_sweep<T>(zn, rn, visit); };
    std::vector<RowState<T>> state = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile, RowState<T>* st) {
      label_forward_tile<T>(form, a, r0, nr, c0, L, tile, st);
    });
    if (form == kInfoNCE && sparse_positives(state, rn.size(0))) {
      positive_dots<T>(zn, rn, a, state);
    } else if (form == kInfoNCE) {
      std::vector<T> C(B);
      for (int64_t i = 0; i < B; ++i) C[i] = state[i].neg.value();
      const std::vector<RowState<T>> terms = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile,
                                                       RowState<T>* st) {
        infonce_positive_tile<T>(a, r0, nr, c0, L, tile, C.data(), st);
      });
      take_positive_terms(state, terms);
    }
    for (int64_t i = 0; i < B; ++i) finalize_row(state[i], form, a.cfg, rows[i], stats + kStats * i);
  }

  // A constant reference set with the gradient taken in the forward: dz [B, D] = ∂(Σ_i ℓ_i)/∂zn at unit
  // grad_rows, which the backward only scales. Up to kOneSweepColumns columns, in one sweep (the
  // fused-linear-cross-entropy idea): each block of rows is multiplied once, finished in memory (the
  // log-sum-exps are known before any gradient entry is needed) and turned into G and dz by one more GEMM,
  // two GEMMs where forward plus backward take three. Wider, the tiled forward and backward.
  template <typename T>
  static void forward_with_grad(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form,
                                T* rows, T* stats, at::Tensor& dz) {
    const int64_t B = zn.size(0), M = rn.size(0), block = kRowBlock;
    const std::vector<T> ones(B, T(1));
    if (M > kOneSweepColumns) {
      forward<T>(zn, rn, a, form, rows, stats);
      at::Tensor no_ref_grad = at::empty({0, zn.size(1)}, zn.options());
      backward<T>(zn, rn, a, form, stats, ones.data(), dz, no_ref_grad);
      return;
    }
    std::vector<T> C(B);
    at::parallel_for(0, (B + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * block, nr = std::min(block, B - r0);
        at::Tensor s = at::mm(zn.narrow(0, r0, nr), rn.t()).contiguous();
        at::Tensor work = s.clone();  // the forward epilogue overwrites its tile with exponents
        std::vector<RowState<T>> st(nr);
        label_forward_tile<T>(form, a, r0, nr, 0, M, work.data_ptr<T>(), st.data());
        if (form == kInfoNCE) {  // the positives' sums add to the states, whose first sweep left them 0
          for (int64_t r = 0; r < nr; ++r) C[r0 + r] = st[r].neg.value();
          infonce_positive_tile<T>(a, r0, nr, 0, M, s.data_ptr<T>(), C.data(), st.data());
        }
        for (int64_t r = 0; r < nr; ++r) finalize_row(st[r], form, a.cfg, rows[r0 + r], stats + kStats * (r0 + r));
        label_backward_tile<T>(form, a, r0, nr, 0, M, s.data_ptr<T>(), stats, ones.data());
        at::Tensor out = dz.narrow(0, r0, nr);
        at::mm_out(out, s, rn);
      }
    });
  }

  // Self-mode backward: per tile pair H = G_IJ + G_JIᵀ, dZ_I += H·Z_J, dZ_J += Hᵀ·Z_I (the diagonal tile:
  // H = G_II + G_IIᵀ, dZ_I += H·Z_I), dZ_J in the round's second step.
  template <typename T>
  static void self_backward(const at::Tensor& zn, const LabelArgs<T>& a, int64_t form, const T* stats,
                            const T* grad_rows, at::Tensor& gz) {
    std::vector<at::Tensor> held((zn.size(0) + kSelfTile - 1) / kSelfTile);  // H of the tile (I, J), for J's step
    auto rows = [&](SelfBlock b) { return zn.narrow(0, b.start, b.size); };
    self_rounds(
        zn.size(0),
        [&](SelfBlock bi, SelfBlock bj) {
          auto [g, g_t] = self_scores(zn, bi, bj);
          label_backward_tile<T>(form, a, bi.start, bi.size, bj.start, bj.size, g.data_ptr<T>(), stats, grad_rows);
          if (!g_t.defined()) {
            gz.narrow(0, bi.start, bi.size).addmm_(g + g.t(), rows(bi));
            return;
          }
          label_backward_tile<T>(form, a, bj.start, bj.size, bi.start, bi.size, g_t.data_ptr<T>(), stats, grad_rows);
          g.add_(g_t.t());
          gz.narrow(0, bi.start, bi.size).addmm_(g, rows(bj));
          held[bj.start / kSelfTile] = g;
        },
        [&](SelfBlock bi, SelfBlock bj) {
          at::Tensor& h = held[bj.start / kSelfTile];
          gz.narrow(0, bj.start, bj.size).addmm_(h.t(), rows(bi));
          h = at::Tensor();
        });
  }

  // Self-mode second derivative (oucl_label_self_bwd_bwd): the cotangent v [N,D] of the gradient a·(G + Gᵀ)·Z
  // puts U = v·Zᵀ + Z·vᵀ on the scores, symmetric like S. Each row's sums need its whole row of S and U
  // (label_rows.inc), so two rounds of the tiles I <= J, each tile read two-way (along its rows for block I,
  // along its columns for block J, no transposed copy): the first adds both blocks' parts of their sums,
  // the second forms H_G = G_IJ + G_JIᵀ and H_W = W_IJ + W_JIᵀ in one pass and takes
  // dZ_I += H_G·v_J + a·H_W·Z_J, dZ_J += H_Gᵀ·v_I + a·H_Wᵀ·Z_I. Five GEMM-equivalents (S and U =
  // [v Z]·[Z v]ᵀ twice over half the tiles; four products over half the tiles), where row chunks of S and
  // U take seven.
  template <typename T>
  static void self_hvp(const at::Tensor& zn, const at::Tensor& v, const LabelArgs<T>& a, int64_t form,
                       const T* stats, const T* grad_rows, T* d_g, at::Tensor& dz) {
    const int64_t N = zn.size(0);
    const at::Tensor vz = at::cat({v, zn}, 1), zv = at::cat({zn, v}, 1);
    auto rows = [](const at::Tensor& x, SelfBlock b) { return x.narrow(0, b.start, b.size); };
    HvpLanes<T> lanes(form, N, stats);
    // S (the similarity applied) and U of the tile (I, J), and the tile as the kernels take it. The affine
    // map rides in the GEMM (addmm with a broadcast offset, as _ops/label.py's _similarities): no pass of its
    // own over the tile.
    const bool affine = a.sim_a != T(1) || a.sim_b != T(0);
    const at::Tensor offset = at::scalar_tensor(a.sim_b, zn.options());
    auto scores = [&](SelfBlock bi, SelfBlock bj) {
      const at::Tensor zi = rows(zn, bi), zj_t = rows(zn, bj).t();
      at::Tensor s = affine ? at::addmm(offset, zi, zj_t, 1, a.sim_a) : at::mm(zi, zj_t);
      return std::make_pair(s, at::mm(rows(vz, bi), rows(zv, bj).t()));
    };
    auto tile = [&](SelfBlock bi, SelfBlock bj, const at::Tensor& s, const at::Tensor& u) {
      return HvpTile<T>{a.labels + bi.start, a.labels + bj.start, bi.size, bj.size, bi.start == bj.start ? 0 : -1,
                        s.data_ptr<T>(), u.data_ptr<T>(), lanes.at(bi.start), lanes.at(bj.start)};
    };
    std::vector<HvpSums<T>> sums(N);
    std::vector<std::vector<T>> col_sums((N + kSelfTile - 1) / kSelfTile);  // block J's part, for J's step
    self_rounds(
        N,
        [&](SelfBlock bi, SelfBlock bj) {
          const auto su = scores(bi, bj);
          const bool two_way = bi.start != bj.start;  // the diagonal tile's rows are its columns
          std::vector<T>& cs = col_sums[bj.start / kSelfTile];
          if (two_way) cs.assign(4 * bj.size, T(0));
          hvp_pass<T>(form, a.cfg, two_way, false, tile(bi, bj, su.first, su.second),
                      {sums.data() + bi.start, cs.data(), nullptr, nullptr});
        },
        [&](SelfBlock, SelfBlock bj) {
          const T* cs = col_sums[bj.start / kSelfTile].data();
          for (int64_t k = 0; k < bj.size; ++k)
            sums[bj.start + k] += HvpSums<T>{cs[k], cs[bj.size + k], cs[2 * bj.size + k], cs[3 * bj.size + k]};
        });
    for (int64_t i = 0; i < N; ++i) lanes.second(form, a.cfg, i, stats + kStats * i, grad_rows[i], sums[i]);
    // dZ_J's part from the tile (I, J), [|J|, D], for J's step: smaller than the tile's H_G and H_W.
    std::vector<at::Tensor> held((N + kSelfTile - 1) / kSelfTile);
    self_rounds(
        N,
        [&](SelfBlock bi, SelfBlock bj) {
          const auto su = scores(bi, bj);
          at::Tensor g = at::empty_like(su.first), w = at::empty_like(su.first);
          hvp_pass<T>(form, a.cfg, true, true, tile(bi, bj, su.first, su.second),
                      {nullptr, nullptr, g.data_ptr<T>(), w.data_ptr<T>()});
          rows(dz, bi).addmm_(g, rows(v, bj)).addmm_(w, rows(zn, bj), 1, a.sim_a);
          if (bi.start != bj.start)
            held[bj.start / kSelfTile] = at::mm(g.t(), rows(v, bi)).addmm_(w.t(), rows(zn, bi), 1, a.sim_a);
        },
        [&](SelfBlock, SelfBlock bj) {
          at::Tensor& h = held[bj.start / kSelfTile];
          rows(dz, bj).add_(h);
          h = at::Tensor();
        });
    dz.mul_(a.sim_a);
    hvp_dg_rows<T>(form, a.cfg, N, stats, sums.data(), a.sim_a, d_g);
  }

  // Cross mode: every tile of S = zn·rnᵀ in the items of `p`, as `tile(rs, cs, r0, nr, c0, L, s)`.
  template <typename Tile>
  static void cross_tiles(const at::Tensor& zn, const at::Tensor& rn, const CrossPlan& p, Tile&& tile) {
    at::parallel_for(0, p.rsplits * p.csplits, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t rs = item / p.csplits, cs = item % p.csplits;
        for (int64_t rb = p.block_begin(rs); rb < p.block_end(rs); ++rb) {
          const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
          const at::Tensor zblk = zn.narrow(0, r0, nr);
          for (int64_t t = p.tile_begin(cs); t < p.tile_end(cs); ++t) {
            const int64_t c0 = t * kColTile, L = std::min(kColTile, p.M - c0);
            at::Tensor s = at::mm(zblk, rn.narrow(0, c0, L).t()).contiguous();
            tile(rs, cs, r0, nr, c0, L, s);
          }
        }
      }
    });
  }

  // Cross-mode sweep: `visit(r0, nr, c0, L, tile, row_states, col_states, scratch)` reads each tile of
  // S = zn·rnᵀ into its rows' and its columns' states (partials of this item's column and row ranges)
  // -> (rows' states [B], columns' states [M]). scratch: [3, kColTile] per item.
  template <typename T, typename Visit>
  static std::pair<std::vector<RowState<T>>, std::vector<RowState<T>>> cross_sweep(const at::Tensor& zn,
                                                                                   const at::Tensor& rn, Visit&& visit) {
    const int64_t B = zn.size(0), M = rn.size(0);
    const CrossPlan p = cross_plan(B, M, sizeof(RowState<T>));
    std::vector<RowState<T>> zp(p.csplits * B), rp(p.rsplits * M);
    std::vector<T> scratch(p.rsplits * p.csplits * 3 * kColTile);
    cross_tiles(zn, rn, p, [&](int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L, at::Tensor& s) {
      visit(r0, nr, c0, L, s.data_ptr<T>(), zp.data() + cs * B + r0, rp.data() + rs * M + c0,
            scratch.data() + (rs * p.csplits + cs) * 3 * kColTile);
    });
    return {merge_partials(zp, p.csplits, B), merge_partials(rp, p.rsplits, M)};
  }

  // Cross-mode forward (InfoNCE): rows and stats of zn's rows against rn and of rn's rows against zn. The
  // column passes read each tile before the row epilogue overwrites it.
  template <typename T>
  static void cross_forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a,
                            const LabelArgs<T>& a_t, T* rows_z, T* stats_z, T* rows_r, T* stats_r) {
    const int64_t B = zn.size(0), M = rn.size(0);
    auto states = cross_sweep<T>(zn, rn, [&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile, RowState<T>* sz,
                                             RowState<T>* sr, T* scratch) {
      METAUG_ISA_SWITCH(
        ns::infonce_cross_cols_lse<T>(a, r0, nr, c0, L, tile, sr, scratch, scratch + kColTile, scratch + 2 * kColTile);
        for (int64_t r = 0; r < nr; ++r) ns::infonce_label_lse_row<T>(a, r0 + r, c0, L, tile + r * L, sz[r]);)
    });
    std::vector<RowState<T>>&sz = states.first, &sr = states.second;
    if (sparse_positives(sz, M)) {  // as many positive pairs seen from either side
      positive_dots<T>(zn, rn, a, sz);
      positive_dots<T>(rn, zn, a_t, sr);
    } else {
      std::vector<T> C(B + M);  // the rows' C, then the columns'
      for (int64_t i = 0; i < B; ++i) C[i] = sz[i].neg.value();
      for (int64_t j = 0; j < M; ++j) C[B + j] = sr[j].neg.value();
      const auto terms = cross_sweep<T>(zn, rn, [&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile,
                                                    RowState<T>* tz, RowState<T>* tr, T*) {
        METAUG_ISA_SWITCH(ns::infonce_cross_cols_pos<T>(a, r0, nr, c0, L, tile, C.data() + B + c0, tr);)
        infonce_positive_tile<T>(a, r0, nr, c0, L, tile, C.data(), tz);
      });
      take_positive_terms(sz, terms.first);
      take_positive_terms(sr, terms.second);
    }
    for (int64_t i = 0; i < B; ++i) finalize_row(sz[i], kInfoNCE, a.cfg, rows_z[i], stats_z + kStats * i);
    for (int64_t j = 0; j < M; ++j) finalize_row(sr[j], kInfoNCE, a.cfg, rows_r[j], stats_r + kStats * j);
  }

  // Cross-mode backward (InfoNCE): per tile H = G_rows + G_cols in one pass over it, dZ += H·R (a partial per
  // column range), dR += Hᵀ·Z (a partial per row range), the partials summed in range order.
  template <typename T>
  static void cross_backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a,
                             const LabelArgs<T>& /*a_t: the columns' terms come from their stats*/, const T* stats_z,
                             const T* grad_z, const T* stats_r, const T* grad_r, at::Tensor& gz, at::Tensor& gr) {
    const int64_t B = zn.size(0), M = rn.size(0), D = zn.size(1);
    const CrossPlan p = cross_plan(B, M, D * int64_t(sizeof(T)));
    at::Tensor pz = at::zeros({p.csplits, B, D}, zn.options()), pr = at::zeros({p.rsplits, M, D}, zn.options());
    // The columns' constants, once: C's parts, coef = g·a·β/n⁺, neg_coef = coef·Σσ, valid.
    std::vector<T> shift(M), log_sum(M), coef(M), neg_coef(M), valid(M);
    for (int64_t j = 0; j < M; ++j) {
      const T* st = stats_r + kStats * j;
      const bool v = st[kValid] != T(0);
      valid[j] = v ? T(1) : T(0);
      shift[j] = v ? st[kNceShift] : T(0);
      log_sum[j] = v ? st[kNceLogSum] : T(0);
      coef[j] = v ? grad_r[j] * a.sim_a * a.cfg.beta / st[kNceNPos] : T(0);
      neg_coef[j] = v ? coef[j] * st[kNceSigmoidSum] : T(0);
    }
    cross_tiles(zn, rn, p, [&](int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L, at::Tensor& h) {
      T* tile = h.data_ptr<T>();
      METAUG_ISA_SWITCH(
        const ns::CrossCols<T> cc{shift.data() + c0, log_sum.data() + c0, coef.data() + c0, neg_coef.data() + c0,
                                  valid.data() + c0};
        for (int64_t r = 0; r < nr; ++r) ns::infonce_cross_backward_row<T>(a, r0 + r, c0, L, tile + r * L,
                                                                           stats_z + kStats * (r0 + r), grad_z[r0 + r], cc);)
      pz[cs].narrow(0, r0, nr).addmm_(h, rn.narrow(0, c0, L));
      pr[rs].narrow(0, c0, L).addmm_(h.t(), zn.narrow(0, r0, nr));
    });
    at::sum_out(gz, pz, 0);
    at::sum_out(gr, pr, 0);
  }

  template <typename T>
  static void backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form,
                       const T* stats, const T* grad_rows, at::Tensor& gz, at::Tensor& gr) {
    if (is_self(zn, rn, a)) return self_backward<T>(zn, a, form, stats, grad_rows, gz);
    const int64_t B = zn.size(0), M = rn.size(0), D = zn.size(1);
    // G tile = ∂(Σ_i grad_i ℓ_i)/∂S for rows [r0, r0 + nr) and columns [c0, c0 + L), recomputed from zn, rn.
    auto grad_tile = [&](int64_t r0, int64_t nr, int64_t c0, int64_t L) {
      at::Tensor tile = at::mm(zn.narrow(0, r0, nr), rn.narrow(0, c0, L).t()).contiguous();
      label_backward_tile<T>(form, a, r0, nr, c0, L, tile.data_ptr<T>(), stats, grad_rows);
      return tile;
    };
    const LabelPlan plan = make_plan(B, M);
    if (gr.size(0) > 0) {
      // Both gradients from one recompute of each tile: items own a range of column tiles, their tiles in
      // order and each tile's row blocks in order, so ∂/∂rn of a tile has one writer; ∂/∂zn has one partial
      // per range, summed in range order. The number of ranges depends on the shape only (partials capped
      // at kPartialBytes).
      const int64_t cap = std::max<int64_t>(1, kPartialBytes / std::max<int64_t>(1, B * D * int64_t(sizeof(T))));
      const int64_t splits = std::max<int64_t>(1, std::min({plan.tiles, kColSplits, cap}));
      at::Tensor parts = at::zeros({splits, B, D}, zn.options());
      at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t split = s0; split < s1; ++split) {
          for (int64_t t = split * plan.tiles / splits; t < (split + 1) * plan.tiles / splits; ++t) {
            const int64_t c0 = t * kColTile, L = std::min(kColTile, M - c0);
            const at::Tensor r_tile = rn.narrow(0, c0, L);
            at::Tensor g_r = gr.narrow(0, c0, L);
            for (int64_t rb = 0; rb < plan.row_blocks; ++rb) {
              const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, B - r0);
              const at::Tensor g = grad_tile(r0, nr, c0, L);
              parts[split].narrow(0, r0, nr).addmm_(g, r_tile);
              g_r.addmm_(g.t(), zn.narrow(0, r0, nr));
            }
          }
        }
      });
      at::sum_out(gz, parts, 0);
      return;
    }
    // A constant reference set: ∂/∂zn = G·rn only; items own (row block, column range), tiles in order.
    at::Tensor gz_parts = at::zeros({plan.splits, B, D}, zn.options());
    at::parallel_for(0, plan.row_blocks * plan.splits, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t rb = item / plan.splits, split = item % plan.splits;
        const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, B - r0);
        at::Tensor out = gz_parts[split].narrow(0, r0, nr);
        for (int64_t t = plan.tile_begin(split); t < plan.tile_end(split); ++t) {
          const int64_t c0 = t * kColTile, L = std::min(kColTile, M - c0);
          out.addmm_(grad_tile(r0, nr, c0, L), rn.narrow(0, c0, L));
        }
      }
    });
    at::sum_out(gz, gz_parts, 0);
  }
};

}  // namespace

// torch.ops.metaug_fast.oucl_label_fwd_grad: oucl_label_fwd's (rows, stats) and, for a constant reference
// set, (∂e [B, D], ∂iz [B]) of Σ_i ℓ_i, so that the backward is those scaled by grad_rows
// (CpuLabel::forward_with_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_fwd_grad(
    const at::Tensor& e, const at::Tensor& iz, const at::Tensor& r, const at::Tensor& ir, const at::Tensor& labels,
    const at::Tensor& ref_labels, int64_t self_offset, int64_t similarity, int64_t form, double beta,
    double gamma_pos, double gamma_neg, double margin, double lam) {
  const LabelInputs<CpuLabel> in(e, iz, r, ir, labels, ref_labels, form, similarity);
  TORCH_CHECK(form != kMargin, "oucl_label_fwd_grad: margin statistics have two outputs per row, not one loss");
  const int64_t B = in.zn.size(0);
  at::Tensor rows = at::empty({B}, in.zn.options()), stats = at::empty({B, kStats}, in.zn.options());
  at::Tensor dz = at::zeros_like(in.zn);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_fwd_grad", [&] {
      const auto a = LabelOps<CpuLabel>::args<scalar_t>(in, self_offset, similarity, beta, gamma_pos, gamma_neg,
                                                        margin, lam);
      CpuLabel::forward_with_grad<scalar_t>(in.zn, in.rn, a, form, rows.data_ptr<scalar_t>(),
                                            stats.data_ptr<scalar_t>(), dz);
    });
  }
  const auto d_e = raw_grads(dz, e, iz);
  return {rows, stats, std::get<0>(d_e), std::get<1>(d_e)};
}

// torch.ops.metaug_fast.oucl_label_self_bwd_bwd: the second derivative of self mode (no reference set: the
// reference rows are zn itself, each anchor's own pair excluded), for the LSE forms and InfoNCE. With
// oucl_label_bwd's gradient a·(G + Gᵀ)·zn and its cotangent v [N,D]: (d_g [N], d_z [N,D]) = the gradients of
// ⟨v, a·(G + Gᵀ)·zn⟩ with respect to grad_rows [N] and zn [N,D], over the tiles on and above the diagonal
// (CpuLabel::self_hvp); every sum in an order fixed by the shape.
std::tuple<at::Tensor, at::Tensor> label_self_bwd_bwd(const at::Tensor& grad_rows, const at::Tensor& zn,
                                                      const at::Tensor& v, const at::Tensor& labels,
                                                      const at::Tensor& stats, int64_t similarity, int64_t form,
                                                      double beta, double gamma_pos, double gamma_neg, double margin,
                                                      double lam) {
  const char* who = "oucl_label_self_bwd_bwd";
  const LabelInputs<CpuLabel> in(zn, zn, labels, labels, form, similarity);
  TORCH_CHECK(is_hvp_form(form), who, ": form must be squared, weighted, circle or InfoNCE, got ", form);
  TORCH_CHECK(v.sizes() == in.zn.sizes() && v.scalar_type() == in.zn.scalar_type() && v.device().is_cpu(), who,
              ": v must be a CPU tensor of zn's shape and dtype");
  const auto checked = label_backward_inputs<CpuLabel>(stats, grad_rows, in.zn, form);
  const int64_t N = in.zn.size(0);
  at::Tensor d_g = at::zeros({N}, in.zn.options()), d_z = at::zeros_like(in.zn);
  if (N == 0) return {d_g, d_z};
  const at::Tensor vc = v.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(in.zn.scalar_type(), "oucl_label_self_bwd_bwd", [&] {
    const auto a = make_label_args<scalar_t>(in.labels, in.labels, 0, similarity, beta, gamma_pos, gamma_neg, margin,
                                             lam);
    CpuLabel::self_hvp<scalar_t>(in.zn, vc, a, form, std::get<0>(checked).data_ptr<scalar_t>(),
                                 std::get<1>(checked).data_ptr<scalar_t>(), d_g.data_ptr<scalar_t>(), d_z);
  });
  return {d_g, d_z};
}

TORCH_LIBRARY_FRAGMENT(metaug_fast, m) {
  m.def("oucl_label_rows_bwd_bwd(Tensor grad_rows, Tensor t, Tensor s, Tensor labels, Tensor ref_labels, "
        "Tensor stats, int row0, int self_offset, int form, float beta, float gamma_pos, float gamma_neg, "
        "float margin, float lam) -> (Tensor, Tensor, Tensor)");
  m.def("oucl_label_self_bwd_bwd(Tensor grad_rows, Tensor zn, Tensor v, Tensor labels, Tensor stats, int similarity, "
        "int form, float beta, float gamma_pos, float gamma_neg, float margin, float lam) -> (Tensor, Tensor)");
  m.def("oucl_label_fwd_grad(Tensor e, Tensor iz, Tensor r, Tensor ir, Tensor labels, Tensor ref_labels, "
        "int self_offset, int similarity, int form, float beta, float gamma_pos, float gamma_neg, float margin, "
        "float lam) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) {
  LabelOps<CpuLabel>::impl(m);
  m.impl("oucl_label_rows_bwd_bwd", &label_rows_bwd_bwd);
  m.impl("oucl_label_self_bwd_bwd", &label_self_bwd_bwd);
  m.impl("oucl_label_fwd_grad", &label_fwd_grad);
  CrossOps<CpuLabel>::impl(m);
}

}  // namespace metaug_fast
