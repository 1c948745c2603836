// Rectangular schedule: rows against a reference set, every (row block, column tile) of row_plan or
// column_plan.
// Included by label.cpp only, after the row kernels (label_rows.inc, compiled per instruction set), inside
// namespace metaug_fast.
#pragma once

namespace label_cpu {

// Rectangular sweep: every (row block, column tile), columns split into plan.csplits ranges; `visit(r0, nr,
// c0, L, tile, states)` consumes a tile into per-split states, merged per row in split order.
template <typename T, typename Visit>
std::vector<RowState<T>> rect_sweep(const at::Tensor& zn, const at::Tensor& rn, Visit&& visit) {
  const int64_t B = zn.size(0);
  const TilePlan plan = row_plan(B, rn.size(0));
  std::vector<RowState<T>> partial(plan.csplits * B);
  for_each_tile(plan, [&](int64_t, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L) {
    at::Tensor tile = tile_scores(zn, rn, r0, nr, c0, L);
    visit(r0, nr, c0, L, tile.data_ptr<T>(), partial.data() + cs * B + r0);
  });
  return merge_partials(partial, plan.csplits, B);
}

// The backward of a reference set: G tile by tile, dZ = G·R and, when the reference needs a gradient, dR =
// Gᵀ·Z (gr [M, D], zeros on entry; empty: not taken).
template <typename T>
void rect_backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a, int64_t form, const T* stats,
                   const T* grad_rows, at::Tensor& gz, at::Tensor& gr) {
  const int64_t B = zn.size(0), M = rn.size(0), D = zn.size(1);
  // G tile = ∂(Σ_i grad_i ℓ_i)/∂S for rows [r0, r0 + nr) and columns [c0, c0 + L), recomputed from zn, rn.
  auto grad_tile = [&](int64_t r0, int64_t nr, int64_t c0, int64_t L) {
    at::Tensor tile = tile_scores(zn, rn, r0, nr, c0, L);
    label_backward_tile<T>(form, a, r0, nr, c0, L, tile.data_ptr<T>(), stats, grad_rows);
    return tile;
  };
  // Both gradients from one recompute of each tile: the column ranges are the items (column_plan), so
  // ∂/∂rn of a tile has one writer; ∂/∂zn has one partial per column range. A constant reference set:
  // ∂/∂zn = G·rn only, items (row block, column range) as the forward's.
  const bool ref_grad = gr.size(0) > 0;
  const TilePlan plan = ref_grad ? column_plan(B, M, D * int64_t(sizeof(T))) : row_plan(B, M);
  at::Tensor gz_parts = at::zeros({plan.csplits, B, D}, zn.options());
  for_each_tile(plan, [&](int64_t, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L) {
    const at::Tensor g = grad_tile(r0, nr, c0, L);
    gz_parts[cs].narrow(0, r0, nr).addmm_(g, rn.narrow(0, c0, L));
    if (ref_grad) gr.narrow(0, c0, L).addmm_(g.t(), zn.narrow(0, r0, nr));
  });
  at::sum_out(gz, gz_parts, 0);
}

}  // namespace label_cpu
