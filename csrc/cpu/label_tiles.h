// The machinery every label-mode schedule shares: the tile sizes, the one work splitter (TilePlan and its
// plans) and tile iterator (for_each_tile) of the rectangular and cross sweeps, self mode's rounds over the
// tiles on and above the diagonal (self_rounds), the epilogue dispatch of a tile's rows, and InfoNCE's
// positives' terms.
// Included by label.cpp only, after the row kernels (label_rows.inc, compiled per instruction set), inside
// namespace metaug_fast.
#pragma once

namespace label_cpu {

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

// The one work splitter of the tiled sweeps: work items are (range of row blocks) × (range of column tiles),
// item (rs, cs) = rs·csplits + cs taking its row blocks in order and, in each, its column tiles in order
// (for_each_tile). So the rows have one partial per column range and the columns one per row range, each
// accumulated in an order fixed by the shape. The plans below differ only in how they cut the ranges.
struct TilePlan {
  int64_t B, M, row_blocks, tiles, rsplits, csplits;
  int64_t block_begin(int64_t rs) const { return rs * row_blocks / rsplits; }
  int64_t block_end(int64_t rs) const { return (rs + 1) * row_blocks / rsplits; }
  int64_t tile_begin(int64_t cs) const { return cs * tiles / csplits; }
  int64_t tile_end(int64_t cs) const { return (cs + 1) * tiles / csplits; }
};

inline TilePlan empty_plan(int64_t B, int64_t M) {
  return {B, M, (B + kRowBlock - 1) / kRowBlock, (M + kColTile - 1) / kColTile, 0, 0};
}

// A range per row block (each row has one writer per column range); the columns cut into kColSplits
// ranges when the row blocks are few. At least one column range: an empty reference set (M = 0, a rank's
// empty shard) still yields every row's state.
inline TilePlan row_plan(int64_t B, int64_t M) {
  TilePlan p = empty_plan(B, M);
  p.rsplits = p.row_blocks;
  p.csplits = p.row_blocks < kColSplits ? std::max<int64_t>(1, std::min<int64_t>(p.tiles, kColSplits)) : 1;
  return p;
}

// Every row block in one range, the columns in ranges of their own (each tile's columns have one writer):
// at most kColSplits of them, fewer while the rows' partials (`row_bytes` a row) would pass kPartialBytes.
inline TilePlan column_plan(int64_t B, int64_t M, int64_t row_bytes) {
  TilePlan p = empty_plan(B, M);
  const int64_t cap = std::max<int64_t>(1, kPartialBytes / std::max<int64_t>(1, B * row_bytes));
  p.rsplits = 1;
  p.csplits = std::max<int64_t>(1, std::min({p.tiles, kColSplits, cap}));
  return p;
}

// Every tile of `p` once, as `tile(rs, cs, r0, nr, c0, L)`: rows [r0, r0 + nr) against columns
// [c0, c0 + L), items in parallel.
template <typename Tile>
void for_each_tile(const TilePlan& p, Tile&& tile) {
  at::parallel_for(0, p.rsplits * p.csplits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t rs = item / p.csplits, cs = item % p.csplits;
      for (int64_t rb = p.block_begin(rs); rb < p.block_end(rs); ++rb) {
        const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
        for (int64_t t = p.tile_begin(cs); t < p.tile_end(cs); ++t) {
          const int64_t c0 = t * kColTile;
          tile(rs, cs, r0, nr, c0, std::min(kColTile, p.M - c0));
        }
      }
    }
  });
}

// S = zn[r0 : r0 + nr]·rn[c0 : c0 + L]ᵀ, [nr, L] contiguous.
inline at::Tensor tile_scores(const at::Tensor& zn, const at::Tensor& rn, int64_t r0, int64_t nr, int64_t c0,
                              int64_t L) {
  return at::mm(zn.narrow(0, r0, nr), rn.narrow(0, c0, L).t()).contiguous();
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

// Cross mode, where both the rows and the columns keep partials: kColSplits items (or every tile, when
// there are fewer) with the fewest partial rows csplits·B + rsplits·M, and fewer items while the partials
// would pass kPartialBytes (`row_bytes` per partial row).
inline TilePlan cross_plan(int64_t B, int64_t M, int64_t row_bytes) {
  TilePlan p = empty_plan(B, M);
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

// The schedule of self mode (see kSelfTile) over N rows: in round r, `tile(bi, bj)` runs for every tile
// (I, I + r) in parallel; then, off the diagonal, `transposed(bi, bj)` runs for every block J = I + r in
// parallel, the one step that writes block J from the tile (I, J).
template <typename Tile, typename Transposed>
void self_rounds(int64_t N, Tile&& tile, Transposed&& transposed) {
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
std::pair<at::Tensor, at::Tensor> self_scores(const at::Tensor& zn, SelfBlock bi, SelfBlock bj) {
  at::Tensor s = at::mm(zn.narrow(0, bi.start, bi.size), zn.narrow(0, bj.start, bj.size).t()).contiguous();
  return {s, bi.start != bj.start ? s.t().contiguous() : at::Tensor()};
}

}  // namespace label_cpu
