// Score-mode OUCL on the CPU: fused forward, backward and double backward, one pass over each row,
// rows spread over threads with at::parallel_for (OpenMP). Registered as torch ops in the `metaug_fast`
// namespace; metaug_fast/_ops/oucl_score.py wraps them in autograd Functions.
//
//   oucl_score_fwd(pos [B,K⁺], neg [B,K⁻], pos_mask?, neg_mask?, form, β, γ⁺, γ⁻, m, λ)
//       -> (rows [B], stats [B,5]: row log-sum-exps and validity), both in the accumulation dtype
//   oucl_score_bwd(grad_rows [B] (accumulation dtype), pos, neg, pos_mask?, neg_mask?, stats, ...) -> (grad_pos, grad_neg)
//   oucl_score_bwd_bwd(grad_rows, gg_pos, gg_neg, pos, neg, pos_mask?, neg_mask?, stats, ...)
//       -> (grad_grad_rows [B], hv_pos [B,K⁺], hv_neg [B,K⁻])
//
// fp16/bf16 inputs accumulate in fp32 (at::opmath_type), fp64 in fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "oucl_common.h"
#include "oucl_host.h"
#include "op_schemas.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace metaug_fast {
namespace {

// Raw pointers for the row kernels; which fields a kernel reads or writes is documented there.
template <typename S, typename T>
struct RowArgs {
  Cfg<T> cfg;
  int64_t kp = 0, kn = 0;
  const S* pos = nullptr;
  const S* neg = nullptr;
  const bool* pos_mask = nullptr;
  const bool* neg_mask = nullptr;
  const T* grad_rows = nullptr;
  const S* gg_pos = nullptr;
  const S* gg_neg = nullptr;
  T* stats = nullptr;
  T* rows = nullptr;
  S* out_pos = nullptr;
  S* out_neg = nullptr;
  T* grad_grad_rows = nullptr;
};

template <typename T>
struct Lse {
  T shift, log_sum;  // LSE = shift + log_sum; kept apart so exp(x - LSE) = exp((x - shift) - log_sum) keeps
                     // the cancellation x - shift exact-ish in fp32 even when |x| is ~β
  T value() const { return shift + log_sum; }
};

template <typename T>
struct RowState {
  Lse<T> pos{T(0), -std::numeric_limits<T>::infinity()};
  Lse<T> neg{T(0), -std::numeric_limits<T>::infinity()};
  T sum_pos = T(0), sum_neg = T(0);  // hinge; InfoNCE's positive terms
  T min_pos = std::numeric_limits<T>::infinity(), max_neg = -std::numeric_limits<T>::infinity();  // margins
  int64_t ties_pos = 0, ties_neg = 0;  // how many entries attain min_pos / max_neg
  int64_t n_pos = 0, n_neg = 0;
};

// Extremum with tie counts: (value, count) of a running min (MIN) or max over merged parts.
template <bool MIN, typename T>
inline void merge_extremum(T& value, int64_t& ties, T other, int64_t other_ties) {
  if (other_ties == 0 || value != value) return;  // NaN is sticky, as in torch.amin/amax
  if (other != other) {
    value = other;
    ties = other_ties;
    return;
  }
  if (ties == 0 || (MIN ? other < value : other > value)) {
    value = other;
    ties = other_ties;
  } else if (other == value) {
    ties += other_ties;
  }
}

// log(e^a + e^b) kept as (shift, log_sum); an empty side has log_sum = -inf.
template <typename T>
static inline Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (a.log_sum == ninf) return b;
  if (b.log_sum == ninf) return a;
  const T s = a.shift > b.shift ? a.shift : b.shift;
  return {s, std::log(std::exp(a.shift - s + a.log_sum) + std::exp(b.shift - s + b.log_sum))};
}

template <typename T>
static inline void merge_state(RowState<T>& into, const RowState<T>& part) {
  into.pos = lse_merge(into.pos, part.pos);
  into.neg = lse_merge(into.neg, part.neg);
  into.sum_pos += part.sum_pos;
  into.sum_neg += part.sum_neg;
  merge_extremum<true>(into.min_pos, into.ties_pos, part.min_pos, part.ties_pos);
  merge_extremum<false>(into.max_neg, into.ties_neg, part.max_neg, part.ties_neg);
  into.n_pos += part.n_pos;
  into.n_neg += part.n_neg;
}

// Label mode: the similarity map s = sim_a·cos + sim_b and the labels that split pairs.
template <typename T>
struct LabelArgs {
  Cfg<T> cfg;
  T sim_a, sim_b;
  bool exclude_self;
  int64_t self_offset;  // the anchor i is reference row i + self_offset (when exclude_self)
  const int64_t* labels;
  const int64_t* ref_labels;
};

// One copy of the row kernels per instruction set. GCC attaches the target of the enclosing pragma to
// every function declared under it, templates included, so each namespace is vectorized for its ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define METAUG_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,bmi2")
namespace isa_avx512 {
#include "oucl_rows.inc"
#include "oucl_label_tiles.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace isa_avx2 {
#include "oucl_rows.inc"
#include "oucl_label_tiles.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif
namespace isa_base {
#include "oucl_rows.inc"
#include "oucl_label_tiles.inc"
}  // namespace isa_base

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef METAUG_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

enum class Pass { kForward, kBackward, kDoubleBackward };

// Picks the kernel for (ISA, pass, form, masks) and runs it over a range of rows.
template <int FORM, typename T, bool PM, bool NM, typename S>
void run_rows(Pass pass, const RowArgs<S, T>& a, int64_t b0, int64_t b1) {
#define METAUG_RUN(NS)                                                                            \
  if constexpr (FORM == kMargin) {                                                                \
    if (pass == Pass::kForward) NS::margin_forward_rows<T, PM, NM>(a, b0, b1);                    \
    else NS::margin_backward_rows<T, PM, NM>(a, b0, b1);                                          \
    return;                                                                                       \
  } else if constexpr (FORM == kInfoNCE) {                                                        \
    switch (pass) {                                                                               \
      case Pass::kForward: NS::infonce_forward_rows<T, PM, NM>(a, b0, b1); return;                \
      case Pass::kBackward: NS::infonce_backward_rows<T, PM, NM>(a, b0, b1); return;              \
      case Pass::kDoubleBackward: NS::infonce_double_backward_rows<T, PM, NM>(a, b0, b1); return; \
    }                                                                                             \
  } else {                                                                                        \
    switch (pass) {                                                                               \
      case Pass::kForward: NS::forward_rows<FORM, T, PM, NM>(a, b0, b1); return;                  \
      case Pass::kBackward: NS::backward_rows<FORM, T, PM, NM>(a, b0, b1); return;                \
      case Pass::kDoubleBackward: NS::double_backward_rows<FORM, T, PM, NM>(a, b0, b1); return;   \
    }                                                                                             \
  }
#ifdef METAUG_MULTI_ISA
  switch (active_isa()) {
    case Isa::kAvx512: METAUG_RUN(isa_avx512) break;
    case Isa::kAvx2: METAUG_RUN(isa_avx2) break;
    case Isa::kBase: break;
  }
#endif
  METAUG_RUN(isa_base)
#undef METAUG_RUN
}

template <typename T, typename S>
void launch(Pass pass, int64_t form, bool pm, bool nm, int64_t B, const RowArgs<S, T>& a) {
  // Rows are independent: each is handled by one thread, so results do not depend on the thread count.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.kp + a.kn));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    with_form(form, [&](auto f) {
      constexpr int FORM = decltype(f)::value;
      if (pm && nm) run_rows<FORM, T, true, true>(pass, a, b0, b1);
      else if (pm) run_rows<FORM, T, true, false>(pass, a, b0, b1);
      else if (nm) run_rows<FORM, T, false, true>(pass, a, b0, b1);
      else run_rows<FORM, T, false, false>(pass, a, b0, b1);
    });
  });
}

ScoreInputs check_inputs(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                         const c10::optional<at::Tensor>& neg_mask, int64_t form) {
  TORCH_CHECK(pos.device().is_cpu() && neg.device().is_cpu(), "oucl_score (cpp): pos and neg must be CPU tensors");
  return score_inputs("oucl_score (cpp)", pos, neg, pos_mask, neg_mask, form);
}

template <typename S, typename T>
RowArgs<S, T> make_args(const ScoreInputs& in, double beta, double gamma_pos, double gamma_neg, double margin,
                        double lam) {
  RowArgs<S, T> a;
  pack_score_args<S, T>(a, in, beta, gamma_pos, gamma_neg, margin, lam);
  return a;
}

void check_stats(const at::Tensor& stats, const at::Tensor& pos) {
  TORCH_CHECK(stats.scalar_type() == acc_type(pos.scalar_type()) && stats.dim() == 2 &&
                  stats.size(0) == pos.size(0) && stats.size(1) == kStats && stats.is_contiguous(),
              "oucl_score (cpp): stats must be the [B,5] tensor returned by oucl_score_fwd");
}

void check_grad_rows(const at::Tensor& g, const at::Tensor& pos) {
  TORCH_CHECK(g.dim() == 1 && g.size(0) == pos.size(0) && g.scalar_type() == acc_type(pos.scalar_type()),
              "oucl_score (cpp): grad_rows must be [B] in the accumulation dtype of pos");
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes() && t.device() == like.device(),
              "oucl_score (cpp): ", name, " must match ", like.sizes(), " ", like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> oucl_score_fwd(const at::Tensor& pos, const at::Tensor& neg,
                                                  const c10::optional<at::Tensor>& pos_mask,
                                                  const c10::optional<at::Tensor>& neg_mask, int64_t form,
                                                  double beta, double gamma_pos, double gamma_neg, double margin,
                                                  double lam) {
  const ScoreInputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  const int64_t B = pos.size(0);
  at::Tensor rows = at::empty({B}, pos.options().dtype(acc_type(pos.scalar_type())));
  at::Tensor stats = at::empty({B, kStats}, pos.options().dtype(acc_type(pos.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.rows = rows.data_ptr<T>();
    a.stats = stats.data_ptr<T>();
    launch<T>(Pass::kForward, form, a.pos_mask, a.neg_mask, B, a);
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> oucl_score_bwd(const at::Tensor& grad_rows, const at::Tensor& pos,
                                                  const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                                                  const c10::optional<at::Tensor>& neg_mask, const at::Tensor& stats,
                                                  int64_t form, double beta, double gamma_pos, double gamma_neg,
                                                  double margin, double lam) {
  const ScoreInputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  check_stats(stats, pos);
  const at::Tensor g = grad_rows.contiguous();
  check_grad_rows(g, pos);
  at::Tensor grad_pos = at::empty_like(in.pos);
  at::Tensor grad_neg = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.out_pos = grad_pos.data_ptr<scalar_t>();
    a.out_neg = grad_neg.data_ptr<scalar_t>();
    launch<T>(Pass::kBackward, form, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return {grad_pos, grad_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> oucl_score_bwd_bwd(
    const at::Tensor& grad_rows, const at::Tensor& gg_pos, const at::Tensor& gg_neg, const at::Tensor& pos,
    const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask, const c10::optional<at::Tensor>& neg_mask,
    const at::Tensor& stats, int64_t form, double beta, double gamma_pos, double gamma_neg, double margin,
    double lam) {
  const ScoreInputs in = check_inputs(pos, neg, pos_mask, neg_mask, form);
  check_stats(stats, pos);
  check_like(gg_pos, pos, "gg_pos");
  check_like(gg_neg, neg, "gg_neg");
  const at::Tensor g = grad_rows.contiguous();
  check_grad_rows(g, pos);
  const at::Tensor tp = gg_pos.contiguous(), tn = gg_neg.contiguous();
  at::Tensor ggo = at::empty_like(g);
  at::Tensor hv_pos = at::empty_like(in.pos);
  at::Tensor hv_neg = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "oucl_score_bwd_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, beta, gamma_pos, gamma_neg, margin, lam);
    a.grad_rows = g.data_ptr<T>();
    a.gg_pos = tp.data_ptr<scalar_t>();
    a.gg_neg = tn.data_ptr<scalar_t>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.grad_grad_rows = ggo.data_ptr<T>();
    a.out_pos = hv_pos.data_ptr<scalar_t>();
    a.out_neg = hv_neg.data_ptr<scalar_t>();
    launch<T>(Pass::kDoubleBackward, form, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return {ggo, hv_pos, hv_neg};
}


// ------------------------------------------------------------------------------------- label mode
// Label-mode OUCL on normalized features: zn [B,D], rn [M,D] (zn itself without a reference set), both
// fp32 or fp64 (Python normalizes, in fp32 for half inputs, so autograd differentiates the normalization).
// self_offset >= 0: anchor i is reference row i + self_offset and that pair is excluded; -1: no exclusion.
// Work items are (block of kRowBlock rows) × (range of kColTile-column tiles): each takes an ATen GEMM
// per tile into a [rows, tile] buffer and runs the fused epilogue on it, so memory is O((B + M)·D) plus
// one tile per thread; B×M is never stored. Backward recomputes each tile and turns it into G = ∂ℓ/∂S in
// place, twice: once by rows for G·rn and once by column tiles for Gᵀ·zn, so that every output row has
// one owner and sums in a fixed order (no per-thread copies of the gradients, no atomics).
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColTile = 512;

#define METAUG_ISA_SWITCH(BODY)                                       \
  switch (active_isa()) {                                             \
    case Isa::kAvx512: { METAUG_IF_MULTI(namespace ns = isa_avx512; BODY) } break; \
    case Isa::kAvx2: { METAUG_IF_MULTI(namespace ns = isa_avx2; BODY) } break;     \
    case Isa::kBase: { namespace ns = isa_base; BODY } break;         \
  }
#ifdef METAUG_MULTI_ISA
#define METAUG_IF_MULTI(...) __VA_ARGS__
#else
#define METAUG_IF_MULTI(...)
#endif

// Work is cut by shape only, never by thread count, and every sum runs in a fixed order, so the result
// does not depend on how many threads run it. A batch with few row blocks (a small batch against a large
// bank) also splits the columns into kColSplits ranges so that every thread has work.
constexpr int64_t kColSplits = 8;

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

template <typename T>
LabelArgs<T> make_label_args(const at::Tensor& labels, const at::Tensor& ref_labels, int64_t self_offset,
                             int64_t similarity, double beta, double gamma_pos, double gamma_neg, double margin,
                             double lam) {
  LabelArgs<T> a;
  a.cfg = make_cfg<T>(beta, gamma_pos, gamma_neg, margin, lam);
  a.sim_a = similarity == kShiftedCosine ? T(0.5) : T(1);
  a.sim_b = similarity == kShiftedCosine ? T(0.5) : T(0);
  a.exclude_self = self_offset >= 0;
  a.self_offset = self_offset;
  a.labels = labels.data_ptr<int64_t>();
  a.ref_labels = ref_labels.data_ptr<int64_t>();
  return a;
}

template <typename T>
void label_forward_tile(int64_t form, const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L,
                        T* tile, RowState<T>* states) {
#define METAUG_FWD_FORMS                                                                                       \
  with_form(form, [&](auto f) {                                                                              \
    constexpr int FORM = decltype(f)::value;                                                                 \
    for (int64_t r = 0; r < nr; ++r) {                                                                       \
      if constexpr (FORM == kMargin) ns::margin_label_row<T>(a, r0 + r, c0, L, tile + r * L, states[r]);     \
      else if constexpr (FORM == kInfoNCE) ns::infonce_label_lse_row<T>(a, r0 + r, c0, L, tile + r * L, states[r]); \
      else ns::label_forward_row<FORM, T>(a, r0 + r, c0, L, tile + r * L, states[r]);                        \
    }                                                                                                        \
  });
  METAUG_ISA_SWITCH(METAUG_FWD_FORMS)
#undef METAUG_FWD_FORMS
}

template <typename T>
void label_backward_tile(int64_t form, const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L,
                         T* tile, const T* stats, const T* grad_rows) {
#define METAUG_BWD_FORMS                                                                                       \
  with_form(form, [&](auto f) {                                                                              \
    constexpr int FORM = decltype(f)::value;                                                                 \
    for (int64_t r = 0; r < nr; ++r) {                                                                       \
      T* row = tile + r * L;                                                                                 \
      const T* st = stats + kStats * (r0 + r);                                                               \
      if constexpr (FORM == kMargin) ns::margin_label_backward_row<T>(a, r0 + r, c0, L, row, st, grad_rows + 2 * (r0 + r)); \
      else if constexpr (FORM == kInfoNCE) ns::infonce_label_backward_row<T>(a, r0 + r, c0, L, row, st, grad_rows[r0 + r]); \
      else ns::label_backward_row<FORM, T>(a, r0 + r, c0, L, row, st, grad_rows[r0 + r]);                  \
    }                                                                                                        \
  });
  METAUG_ISA_SWITCH(METAUG_BWD_FORMS)
#undef METAUG_BWD_FORMS
}

// InfoNCE's second forward sweep: the positives' terms, given each row's negative log-sum-exp C.
template <typename T>
void infonce_positive_tile(const LabelArgs<T>& a, int64_t r0, int64_t nr, int64_t c0, int64_t L, const T* tile,
                           const T* C, RowState<T>* states) {
  METAUG_ISA_SWITCH(
      for (int64_t r = 0; r < nr; ++r) ns::infonce_label_pos_row<T>(a, r0 + r, c0, L, tile + r * L, C[r0 + r], states[r]);)
}

void check_label_inputs(const at::Tensor& zn, const at::Tensor& rn, const at::Tensor& labels,
                        const at::Tensor& ref_labels, int64_t form, int64_t similarity) {
  TORCH_CHECK(zn.device().is_cpu() && rn.device().is_cpu(), "oucl_label (cpp): CPU tensors only");
  TORCH_CHECK(zn.dim() == 2 && rn.dim() == 2 && zn.size(1) == rn.size(1), "oucl_label (cpp): zn [B,D], rn [M,D]");
  TORCH_CHECK(zn.scalar_type() == rn.scalar_type() &&
                  (zn.scalar_type() == at::kFloat || zn.scalar_type() == at::kDouble),
              "oucl_label (cpp): zn and rn must both be float32 or both float64");
  TORCH_CHECK(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong &&
                  labels.numel() == zn.size(0) && ref_labels.numel() == rn.size(0),
              "oucl_label (cpp): labels [B] and ref_labels [M] must be int64");
  TORCH_CHECK(is_form(form), "oucl_label (cpp): unknown form id ", form);
  TORCH_CHECK(similarity == kShiftedCosine || similarity == kCosine, "oucl_label (cpp): unknown similarity id ", similarity);
}

std::tuple<at::Tensor, at::Tensor> oucl_label_fwd(const at::Tensor& zn_in, const at::Tensor& rn_in,
                                                  const at::Tensor& labels_in, const at::Tensor& ref_labels_in,
                                                  int64_t self_offset, int64_t similarity, int64_t form, double beta,
                                                  double gamma_pos, double gamma_neg, double margin, double lam) {
  check_label_inputs(zn_in, rn_in, labels_in, ref_labels_in, form, similarity);
  // The tile GEMMs are internal: keep autograd from recording them (it would keep every tile alive).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  // Detached: gradient buffers are allocated with zn.options(), which would carry requires_grad.
  const at::Tensor zn = zn_in.detach().contiguous(), rn = rn_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const int64_t B = zn.size(0), M = rn.size(0);
  at::Tensor rows = at::zeros({B}, zn.options());
  at::Tensor stats = at::zeros({B, kStats}, zn.options());
  AT_DISPATCH_FLOATING_TYPES(zn.scalar_type(), "oucl_label_fwd", [&] {
    using T = scalar_t;
    const auto a = make_label_args<T>(labels, ref_labels, self_offset, similarity, beta, gamma_pos, gamma_neg,
                                      margin, lam);
    const LabelPlan plan = make_plan(B, M);
    // One sweep over all tiles; `visit(r0, nr, c0, L, tile, states)` consumes a tile into per-split states,
    // which are then merged per row in split order.
    auto sweep = [&](auto&& visit) {
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
      std::vector<RowState<T>> merged(partial.begin(), partial.begin() + B);
      for (int64_t i = 0; i < B; ++i)
        for (int64_t sp = 1; sp < plan.splits; ++sp) merge_state(merged[i], partial[sp * B + i]);
      return merged;
    };
    std::vector<RowState<T>> state = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile, RowState<T>* st) {
      label_forward_tile<T>(form, a, r0, nr, c0, L, tile, st);
    });
    if (form == kInfoNCE) {
      std::vector<T> C(B);
      for (int64_t i = 0; i < B; ++i) C[i] = state[i].neg.value();
      const std::vector<RowState<T>> terms = sweep([&](int64_t r0, int64_t nr, int64_t c0, int64_t L, T* tile,
                                                       RowState<T>* st) {
        infonce_positive_tile<T>(a, r0, nr, c0, L, tile, C.data(), st);
      });
      for (int64_t i = 0; i < B; ++i) {
        state[i].sum_pos = terms[i].sum_pos;
        state[i].sum_neg = terms[i].sum_neg;
      }
    }
    T* out = rows.data_ptr<T>();
    T* st = stats.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      const RowState<T>& s = state[i];
      T* row_st = st + kStats * i;
      // The row's parts are written even for an invalid row (its loss stays 0): a caller that combines
      // partial reference sets (ring mode) needs each part's log-sum-exps or sums.
      const bool valid = s.n_pos > 0 && s.n_neg > 0;
      row_st[kValid] = valid ? T(1) : T(0);
      if (form == kMargin) {
        row_st[kPMin] = s.min_pos;
        row_st[kNMax] = s.max_neg;
        row_st[kTiesPos] = T(s.ties_pos);
        row_st[kTiesNeg] = T(s.ties_neg);
      } else if (form == kInfoNCE) {
        row_st[kNceShift] = s.neg.shift;
        row_st[kNceLogSum] = s.neg.log_sum;
        row_st[kNceSigmoidSum] = s.sum_neg;
        row_st[kNceNPos] = T(s.n_pos);
        if (valid) out[i] = s.sum_pos / T(s.n_pos);
      } else if (form == kHinge) {
        const T arg = s.sum_neg - s.sum_pos + a.cfg.lam;
        row_st[kHingeArg] = arg;
        if (valid) out[i] = arg > T(0) || arg != arg ? arg : T(0);
      } else {
        row_st[kPosShift] = s.pos.shift;
        row_st[kPosLogSum] = s.pos.log_sum;
        row_st[kNegShift] = s.neg.shift;
        row_st[kNegLogSum] = s.neg.log_sum;
        const T x = s.pos.value() + s.neg.value();
        if (valid) out[i] = (x > T(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x))) * a.cfg.inv_beta;
      }
    }
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> oucl_label_bwd(const at::Tensor& grad_rows_in, const at::Tensor& zn_in,
                                                  const at::Tensor& rn_in, const at::Tensor& labels_in,
                                                  const at::Tensor& ref_labels_in, const at::Tensor& stats_in,
                                                  int64_t self_offset, int64_t similarity, int64_t form, double beta,
                                                  double gamma_pos, double gamma_neg, double margin, double lam,
                                                  bool ref_grad) {
  check_label_inputs(zn_in, rn_in, labels_in, ref_labels_in, form, similarity);
  // The tile GEMMs are internal: keep autograd from recording them (it would keep every tile alive).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  // Detached: gradient buffers are allocated with zn.options(), which would carry requires_grad.
  const at::Tensor zn = zn_in.detach().contiguous(), rn = rn_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous(), ref_labels = ref_labels_in.contiguous();
  const at::Tensor stats = stats_in.contiguous(), grad_rows = grad_rows_in.contiguous();
  // ref_grad = false (a memory bank, a constant): ∂/∂rn is returned as a [0, D] tensor and phase 2 skipped.
  const int64_t B = zn.size(0), M = rn.size(0), D = zn.size(1);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({B, kStats}) && stats.scalar_type() == zn.scalar_type(),
              "oucl_label (cpp): stats must be the [B,5] tensor returned by oucl_label_fwd");
  TORCH_CHECK(grad_rows.size(0) == B && grad_rows.scalar_type() == zn.scalar_type() &&
                  (form == kMargin ? grad_rows.dim() == 2 && grad_rows.size(1) == 2 : grad_rows.dim() == 1),
              "oucl_label (cpp): grad_rows must be [B] ([B,2]: σ⁺, σ⁻ for margins) in the dtype of zn");
  at::Tensor gz_parts, gr = at::zeros({ref_grad ? M : 0, D}, zn.options());
  AT_DISPATCH_FLOATING_TYPES(zn.scalar_type(), "oucl_label_bwd", [&] {
    using T = scalar_t;
    const auto a = make_label_args<T>(labels, ref_labels, self_offset, similarity, beta, gamma_pos, gamma_neg,
                                      margin, lam);
    const LabelPlan plan = make_plan(B, M);
    gz_parts = at::zeros({plan.splits, B, D}, zn.options());
    // G tile = ∂(Σ_i grad_i ℓ_i)/∂S for rows [r0, r0 + nr) and columns [c0, c0 + L), recomputed from zn, rn.
    auto grad_tile = [&](int64_t r0, int64_t nr, int64_t c0, int64_t L) {
      at::Tensor tile = at::mm(zn.narrow(0, r0, nr), rn.narrow(0, c0, L).t()).contiguous();
      label_backward_tile<T>(form, a, r0, nr, c0, L, tile.data_ptr<T>(), stats.data_ptr<T>(), grad_rows.data_ptr<T>());
      return tile;
    };
    // Phase 1, ∂/∂zn = G·rn: items own (row block, column range), tiles of a range in order.
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
    // Phase 2, ∂/∂rn = Gᵀ·zn: items own a column tile, row blocks in order.
    at::parallel_for(0, ref_grad ? plan.tiles : 0, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kColTile, L = std::min(kColTile, M - c0);
        at::Tensor out = gr.narrow(0, c0, L);
        for (int64_t rb = 0; rb < plan.row_blocks; ++rb) {
          const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, B - r0);
          out.addmm_(grad_tile(r0, nr, c0, L).t(), zn.narrow(0, r0, nr));
        }
      }
    });
  });
  return {gz_parts.sum(0), gr};
}

// Score-mode margin statistics: stats [B,5] = (p_min, n_max, ties_p, ties_n, valid) in the accumulation dtype.
at::Tensor margin_score_fwd(const at::Tensor& pos, const at::Tensor& neg, const c10::optional<at::Tensor>& pos_mask,
                            const c10::optional<at::Tensor>& neg_mask) {
  const ScoreInputs in = check_inputs(pos, neg, pos_mask, neg_mask, kMargin);
  at::Tensor stats = at::empty({pos.size(0), kStats}, pos.options().dtype(acc_type(pos.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "margin_score_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, 1.0, 0.0, 0.0, 0.0, 0.0);
    a.stats = stats.data_ptr<T>();
    launch<T>(Pass::kForward, kMargin, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> margin_score_bwd(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& neg,
                                                    const c10::optional<at::Tensor>& pos_mask,
                                                    const c10::optional<at::Tensor>& neg_mask, const at::Tensor& stats) {
  const ScoreInputs in = check_inputs(pos, neg, pos_mask, neg_mask, kMargin);
  check_stats(stats, pos);
  const at::Tensor g = grad.contiguous();
  TORCH_CHECK(g.dim() == 2 && g.size(0) == pos.size(0) && g.size(1) == 2 && g.scalar_type() == stats.scalar_type(),
              "margin_score (cpp): grad must be [B,2] (σ⁺, σ⁻) in the accumulation dtype");
  at::Tensor gp = at::empty_like(in.pos), gn = at::empty_like(in.neg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "margin_score_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, T>(in, 1.0, 0.0, 0.0, 0.0, 0.0);
    a.grad_rows = g.data_ptr<T>();
    a.stats = const_cast<T*>(stats.data_ptr<T>());
    a.out_pos = gp.data_ptr<scalar_t>();
    a.out_neg = gn.data_ptr<scalar_t>();
    launch<T>(Pass::kBackward, kMargin, a.pos_mask, a.neg_mask, pos.size(0), a);
  });
  return {gp, gn};
}

std::string cpu_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBase: break;
  }
  return "baseline";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metaug_fast, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  define_kernel_ops(m);
}

TORCH_LIBRARY_IMPL(metaug_fast, CPU, m) {
  m.impl("oucl_score_fwd", &oucl_score_fwd);
  m.impl("oucl_score_bwd", &oucl_score_bwd);
  m.impl("oucl_score_bwd_bwd", &oucl_score_bwd_bwd);
  m.impl("margin_score_fwd", &margin_score_fwd);
  m.impl("margin_score_bwd", &margin_score_bwd);
  m.impl("oucl_label_fwd", &oucl_label_fwd);
  m.impl("oucl_label_bwd", &oucl_label_bwd);
}

}  // namespace metaug_fast
