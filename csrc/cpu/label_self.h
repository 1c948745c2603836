// Self schedule (no reference set: S = Z·Zᵀ is symmetric): the tiles on and above the diagonal in
// self_rounds, each feeding its rows and, transposed, its columns.
// Included by label.cpp only, after the row kernels (label_rows.inc, compiled per instruction set), inside
// namespace metaug_fast.
#pragma once

namespace label_cpu {

// Self-mode sweep: the rows of each tile into their states, its columns into a per-block buffer merged
// in the round's second step; the same `visit` as rect_sweep.
template <typename T, typename Visit>
std::vector<RowState<T>> self_sweep(const at::Tensor& zn, Visit&& visit) {
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

// Self-mode backward: per tile pair H = G_IJ + G_JIᵀ, dZ_I += H·Z_J, dZ_J += Hᵀ·Z_I (the diagonal tile:
// H = G_II + G_IIᵀ, dZ_I += H·Z_I), dZ_J in the round's second step.
template <typename T>
void self_backward(const at::Tensor& zn, const LabelArgs<T>& a, int64_t form, const T* stats,
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

}  // namespace label_cpu
