// Cross schedule (InfoNCE both ways between two sets, CLIP's loss): every tile of S = Z·Rᵀ once, read along
// its rows and along its columns, over cross_plan.
// Included by label.cpp only, after the row kernels (label_rows.inc, compiled per instruction set), inside
// namespace metaug_fast.
#pragma once

namespace label_cpu {

// Cross-mode sweep: `visit(r0, nr, c0, L, tile, row_states, col_states, scratch)` reads each tile of
// S = zn·rnᵀ into its rows' and its columns' states (partials of this item's column and row ranges)
// -> (rows' states [B], columns' states [M]). scratch: [3, kColTile] per item.
template <typename T, typename Visit>
std::pair<std::vector<RowState<T>>, std::vector<RowState<T>>> cross_sweep(const at::Tensor& zn,
                                                                                 const at::Tensor& rn, Visit&& visit) {
  const int64_t B = zn.size(0), M = rn.size(0);
  const TilePlan p = cross_plan(B, M, sizeof(RowState<T>));
  std::vector<RowState<T>> zp(p.csplits * B), rp(p.rsplits * M);
  std::vector<T> scratch(p.rsplits * p.csplits * 3 * kColTile);
  for_each_tile(p, [&](int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L) {
    at::Tensor s = tile_scores(zn, rn, r0, nr, c0, L);
    visit(r0, nr, c0, L, s.data_ptr<T>(), zp.data() + cs * B + r0, rp.data() + rs * M + c0,
          scratch.data() + (rs * p.csplits + cs) * 3 * kColTile);
  });
  return {merge_partials(zp, p.csplits, B), merge_partials(rp, p.rsplits, M)};
}

// Cross-mode forward (InfoNCE): rows and stats of zn's rows against rn and of rn's rows against zn. The
// column passes read each tile before the row epilogue overwrites it.
template <typename T>
void cross_forward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a,
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
void cross_backward(const at::Tensor& zn, const at::Tensor& rn, const LabelArgs<T>& a,
                           const LabelArgs<T>& /*a_t: the columns' terms come from their stats*/, const T* stats_z,
                           const T* grad_z, const T* stats_r, const T* grad_r, at::Tensor& gz, at::Tensor& gr) {
  const int64_t B = zn.size(0), M = rn.size(0), D = zn.size(1);
  const TilePlan p = cross_plan(B, M, D * int64_t(sizeof(T)));
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
  for_each_tile(p, [&](int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t c0, int64_t L) {
    at::Tensor h = tile_scores(zn, rn, r0, nr, c0, L);
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

}  // namespace label_cpu
