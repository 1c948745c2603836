// The meta step's second derivative: the label-aware HVP kernels' dispatch (hvp_pass), the op on row
// chunks (label_rows_bwd_bwd) and self mode's over the symmetric tiles in two rounds (self_hvp).
// Included by label.cpp only, after the row kernels (label_rows.inc, compiled per instruction set), inside
// namespace metaug_fast.
#pragma once

namespace label_cpu {

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
    const HvpConsts<T> k = hvp_row_consts(form == kInfoNCE, c, st, g, s.a, s.b, s.c, s.d);
    coef[i] = k.coef, c1[i] = k.c1, sa[i] = k.sa, sb[i] = k.sb, s_sig[i] = k.s_sig;
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
  for (int64_t r = 0; r < n; ++r) {
    const T* st = stats + kStats * r;
    const HvpSums<T>& s = sums[r];
    d_g[r] = st[kValid] == T(0) ? T(0)
                                : scale * hvp_row_consts(form == kInfoNCE, cfg, st, T(0), s.a, s.b, s.c, s.d).d_g;
  }
}

// The checked, contiguous inputs of the row-chunk ops: scores s [R, M] (the similarity applied), the
// cotangent t [R, M] on them, the rows' stats [R, kStats], labels [R] and ref_labels [M].
struct RowsHvpInputs {
  at::Tensor s, t, stats, labels, ref_labels;
  int64_t R, M;

  RowsHvpInputs(const char* who, const at::Tensor& t_, const at::Tensor& s_, const at::Tensor& labels_,
                const at::Tensor& ref_labels_, const at::Tensor& stats_, int64_t form) {
    TORCH_CHECK(s_.dim() == 2 && t_.sizes() == s_.sizes() && s_.device().is_cpu() && t_.device().is_cpu() &&
                    s_.scalar_type() == t_.scalar_type() &&
                    (s_.scalar_type() == at::kFloat || s_.scalar_type() == at::kDouble),
                who, ": s and t must be CPU [R, M] tensors of one dtype, float32 or float64");
    R = s_.size(0), M = s_.size(1);
    TORCH_CHECK(stats_.sizes() == at::IntArrayRef({R, kStats}) && stats_.scalar_type() == s_.scalar_type(), who,
                ": stats must be [R, ", kStats, "] in the dtype of s");
    TORCH_CHECK(labels_.scalar_type() == at::kLong && ref_labels_.scalar_type() == at::kLong &&
                    labels_.numel() == R && ref_labels_.numel() == M,
                who, ": labels [R] and ref_labels [M] must be int64");
    TORCH_CHECK(is_hvp_form(form), who, ": form must be squared, weighted, circle or InfoNCE, got ", form);
    s = s_.contiguous(), t = t_.contiguous(), stats = stats_.contiguous();
    labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  }

  // Row r as a one-row tile (row r is row row0 + r of the batch, for the excluded pair).
  template <typename T>
  HvpTile<T> row(int64_t r, int64_t row0, int64_t self_offset, const HvpLanes<T>& lanes) const {
    return {labels.data_ptr<int64_t>() + r, ref_labels.data_ptr<int64_t>(), 1, M,
            self_offset >= 0 ? row0 + self_offset + r : -1, s.data_ptr<T>() + r * M, t.data_ptr<T>() + r * M,
            lanes.at(r), lanes.at(r)};
  }
};

// torch.ops.metaug_fast.oucl_label_rows_hvp_sums: round 1 of the HVP alone, over the columns at hand:
// (sums [R, 4], d_g [R]) = the rows' sums of t over these columns (HvpSums a, b, c, d) and their part of
// d_g = ∂ℓ/∂s · t. Both add over disjoint column sets (the stats, and so the softmax weights, are the whole
// row's): a reference set split across processes sums its parts, then oucl_label_rows_bwd_bwd takes the
// whole rows' sums.
inline std::tuple<at::Tensor, at::Tensor> label_rows_hvp_sums(
    const at::Tensor& t, const at::Tensor& s, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& stats, int64_t row0, int64_t self_offset, int64_t form, double beta, double gamma_pos,
    double gamma_neg, double margin, double lam) {
  const RowsHvpInputs in("oucl_label_rows_hvp_sums", t, s, labels, ref_labels, stats, form);
  at::Tensor sums = at::zeros({in.R, 4}, in.s.options()), d_g = at::empty({in.R}, in.s.options());
  AT_DISPATCH_FLOATING_TYPES(in.s.scalar_type(), "oucl_label_rows_hvp_sums", [&] {
    const Cfg<scalar_t> cfg = make_cfg<scalar_t>(beta, gamma_pos, gamma_neg, margin, lam);
    const scalar_t* stp = in.stats.data_ptr<scalar_t>();
    HvpLanes<scalar_t> lanes(form, in.R, stp);
    scalar_t* out = sums.data_ptr<scalar_t>();
    at::parallel_for(0, in.R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        HvpSums<scalar_t> part;
        hvp_pass<scalar_t>(form, cfg, false, false, in.row(r, row0, self_offset, lanes),
                           {&part, nullptr, nullptr, nullptr});
        out[4 * r] = part.a, out[4 * r + 1] = part.b, out[4 * r + 2] = part.c, out[4 * r + 3] = part.d;
        hvp_dg_rows<scalar_t>(form, cfg, 1, stp + kStats * r, &part, scalar_t(1), d_g.data_ptr<scalar_t>() + r);
      }
    });
  });
  return {sums, d_g};
}

// torch.ops.metaug_fast.oucl_label_rows_bwd_bwd: the label-mode HVP's kernel on a chunk of R rows of
// scores s [R, M] (the similarity applied) with the cotangent t [R, M] on them, for the LSE forms and
// InfoNCE (the hinge's Hessian is zero; margins are piecewise linear): (d_g [R], G [R, M], W [R, M]) =
// (∂ℓ/∂s · t, ∂(g·ℓ)/∂s, g·H t) per row. Row r is row row0 + r of the batch (for the excluded pair
// j = i + self_offset when self_offset >= 0). Without `sums` the M columns are the whole rows and round 1
// runs here; with `sums` [R, 4] (the whole rows' round-1 sums, oucl_label_rows_hvp_sums added over every
// part of the reference set) the columns may be any part of it, and d_g is that of the given sums. Rows
// are independent: one thread each.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> label_rows_bwd_bwd(
    const at::Tensor& grad_rows, const at::Tensor& t, const at::Tensor& s, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& stats, int64_t row0, int64_t self_offset, int64_t form,
    double beta, double gamma_pos, double gamma_neg, double margin, double lam,
    const c10::optional<at::Tensor>& sums) {
  const char* who = "oucl_label_rows_bwd_bwd";
  const RowsHvpInputs in(who, t, s, labels, ref_labels, stats, form);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.R && grad_rows.scalar_type() == in.s.scalar_type(),
              who, ": grad_rows must be [R] in the dtype of s");
  TORCH_CHECK(!sums || (sums->sizes() == at::IntArrayRef({in.R, 4}) && sums->scalar_type() == in.s.scalar_type() &&
                        sums->device().is_cpu()),
              who, ": sums must be a CPU [R, 4] tensor in the dtype of s");
  const at::Tensor g = grad_rows.contiguous(), given = sums ? sums->contiguous() : at::Tensor();
  at::Tensor d_g = at::empty({in.R}, in.s.options()), G = at::empty_like(in.s), W = at::empty_like(in.s);
  AT_DISPATCH_FLOATING_TYPES(in.s.scalar_type(), "oucl_label_rows_bwd_bwd", [&] {
    const Cfg<scalar_t> cfg = make_cfg<scalar_t>(beta, gamma_pos, gamma_neg, margin, lam);
    const scalar_t* stp = in.stats.data_ptr<scalar_t>();
    HvpLanes<scalar_t> lanes(form, in.R, stp);
    at::parallel_for(0, in.R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // both passes per row, while the row is in cache
        const HvpTile<scalar_t> row = in.row(r, row0, self_offset, lanes);
        HvpSums<scalar_t> whole;
        if (given.defined()) {
          const scalar_t* gs = given.data_ptr<scalar_t>() + 4 * r;
          whole = {gs[0], gs[1], gs[2], gs[3]};
        } else {
          hvp_pass<scalar_t>(form, cfg, false, false, row, {&whole, nullptr, nullptr, nullptr});
        }
        lanes.second(form, cfg, r, stp + kStats * r, g.data_ptr<scalar_t>()[r], whole);
        hvp_pass<scalar_t>(form, cfg, false, true, row,
                           {nullptr, nullptr, G.data_ptr<scalar_t>() + r * in.M, W.data_ptr<scalar_t>() + r * in.M});
        hvp_dg_rows<scalar_t>(form, cfg, 1, stp + kStats * r, &whole, scalar_t(1), d_g.data_ptr<scalar_t>() + r);
      }
    });
  });
  return {d_g, G, W};
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
void self_hvp(const at::Tensor& zn, const at::Tensor& v, const LabelArgs<T>& a, int64_t form,
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

}  // namespace label_cpu
