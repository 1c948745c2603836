// What the CPU (cpu/) and CUDA (cuda/) kernels share, callable from host and device code: the form and
// similarity ids, the per-row stats layout, the kernels' argument structs, the exponents u(p), v(n) of each
// OUCL form with their derivatives, and the per-row maths (softplus, sigmoid, the log-sum-exp and extremum
// merges, a row's running state and how it becomes the row's loss and stats). The ids and the layout are
// the contracts of metaug_fast/contract.py (tests/test_contract_names.py checks that both languages agree).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef __CUDACC__
#define METAUG_HD __host__ __device__
#else
#define METAUG_HD
#endif

namespace metaug_fast {

#ifndef __CUDACC__
// Host code calls the maths below unqualified, as device code does, and gets the float overloads for float.
using std::exp;
using std::isfinite;
using std::log;
using std::log1p;
#endif

// kInfoNCE runs InfoNCE on the same machinery with β = 1/τ; kMargin computes margin statistics (label mode).
enum FormId : int64_t { kHinge = 0, kSquared = 1, kWeighted = 2, kCircle = 3, kInfoNCE = 4, kMargin = 5 };

// Every form id, once: METAUG_FORMS(X) expands X(id) for each. with_form and is_form follow from it, so a
// new form is a new FormId, its Terms below, and its kernels' branches.
#define METAUG_FORMS(X) X(kHinge) X(kSquared) X(kWeighted) X(kCircle) X(kInfoNCE) X(kMargin)

constexpr bool is_form(int64_t form) {
#define METAUG_IS_FORM(ID) form == ID ||
  return METAUG_FORMS(METAUG_IS_FORM) false;
#undef METAUG_IS_FORM
}

// The forms with a label-aware second derivative (the hinge's Hessian is zero; margins are piecewise linear),
// as metaug_fast/contract.py's HVP_FORMS lists them (tests/test_contract_names.py compares the two).
#define METAUG_HVP_FORMS(X) X(kSquared) X(kWeighted) X(kCircle) X(kInfoNCE)

constexpr bool is_hvp_form(int64_t form) {
#define METAUG_IS_HVP_FORM(ID) form == ID ||
  return METAUG_HVP_FORMS(METAUG_IS_HVP_FORM) false;
#undef METAUG_IS_HVP_FORM
}

// Calls f(std::integral_constant<int, FORM>{}) for the run-time form id, so kernels are templated on it; the
// one dispatch idiom of the CPU and CUDA hosts. Callers check is_form first.
template <typename F>
void with_form(int64_t form, F&& f) {
  switch (form) {
#define METAUG_FORM_CASE(ID) \
  case ID: f(std::integral_constant<int, ID>{}); break;
    METAUG_FORMS(METAUG_FORM_CASE)
#undef METAUG_FORM_CASE
  }
}

enum SimilarityId : int64_t { kShiftedCosine = 0, kCosine = 1 };  // (1 + cos)/2, cos

// The per-row state stats[B, kStats] every forward saves for its backward. A slot means something per form,
// so each meaning has its name: the log-sum-exp forms keep A = LSE u(p) and C = LSE v(n) as (shift, log_sum)
// pairs; the hinge its argument Σn - Σp + λ; InfoNCE C, Σσ(C - βp) and n⁺; margins p_min, n_max and ties.
enum Stat : int64_t {
  kPosShift = 0, kPosLogSum = 1, kNegShift = 2, kNegLogSum = 3, kValid = 4,
  kHingeArg = 0,
  kNceShift = 0, kNceLogSum = 1, kNceSigmoidSum = 2, kNceNPos = 3,
  kPMin = 0, kNMax = 1, kTiesPos = 2, kTiesNeg = 3,
};
constexpr int64_t kStats = 5;

template <typename T>
struct Cfg {
  T beta, inv_beta, gamma_pos, gamma_neg, margin, lam;
};

enum class Pass { kForward, kBackward, kDoubleBackward };

// Score mode: raw pointers into the [B,K] inputs and outputs, masks null when absent; which fields a pass
// reads or writes is documented at its kernel. S is the storage type, T the accumulation type.
template <typename S, typename T>
struct ScoreArgs {
  Cfg<T> cfg;
  int64_t B = 0, kp = 0, kn = 0;
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

// Label mode: the similarity map s = sim_a·cos + sim_b and the labels that split pairs. Pair (i, j) is
// positive when the labels agree, negative otherwise; with exclude_self, j = i + self_offset is neither.
template <typename T>
struct LabelArgs {
  Cfg<T> cfg;
  T sim_a, sim_b;
  bool exclude_self;
  int64_t self_offset;
  const int64_t* labels;
  const int64_t* ref_labels;
};

// u(p), v(n) and their first and second derivatives per form. The circle form's Γ weights are
// constants for differentiation (docs/mathematics.md#circle-weights), so its u'' and v'' are zero like the weighted form's.
template <int FORM, typename T>
struct Terms;

template <typename T>
struct Terms<kSquared, T> {
  METAUG_HD static inline T u(const Cfg<T>& c, T p) { const T d = p - T(1); return c.beta * d * d; }
  METAUG_HD static inline T du(const Cfg<T>& c, T p) { return T(2) * c.beta * (p - T(1)); }
  METAUG_HD static inline T d2u(const Cfg<T>& c, T) { return T(2) * c.beta; }
  METAUG_HD static inline T v(const Cfg<T>& c, T n) { return c.beta * (n * n - T(2) * c.margin * c.margin); }
  METAUG_HD static inline T dv(const Cfg<T>& c, T n) { return T(2) * c.beta * n; }
  METAUG_HD static inline T d2v(const Cfg<T>& c, T) { return T(2) * c.beta; }
};

template <typename T>
struct Terms<kWeighted, T> {
  METAUG_HD static inline T u(const Cfg<T>& c, T p) { return -c.beta * (p - c.gamma_pos); }
  METAUG_HD static inline T du(const Cfg<T>& c, T) { return -c.beta; }
  METAUG_HD static inline T d2u(const Cfg<T>&, T) { return T(0); }
  METAUG_HD static inline T v(const Cfg<T>& c, T n) { return c.beta * (n - c.gamma_neg); }
  METAUG_HD static inline T dv(const Cfg<T>& c, T) { return c.beta; }
  METAUG_HD static inline T d2v(const Cfg<T>&, T) { return T(0); }
};

template <typename T>
struct Terms<kCircle, T> {
  METAUG_HD static inline T gp(const Cfg<T>& c, T p) { const T g = T(1) + c.margin - p; return g > T(0) ? g : T(0); }
  METAUG_HD static inline T gn(const Cfg<T>& c, T n) { const T g = n + c.margin; return g > T(0) ? g : T(0); }
  METAUG_HD static inline T u(const Cfg<T>& c, T p) { return -c.beta * gp(c, p) * (p - (T(1) - c.margin)); }
  METAUG_HD static inline T du(const Cfg<T>& c, T p) { return -c.beta * gp(c, p); }
  METAUG_HD static inline T d2u(const Cfg<T>&, T) { return T(0); }
  METAUG_HD static inline T v(const Cfg<T>& c, T n) { return c.beta * gn(c, n) * (n - c.margin); }
  METAUG_HD static inline T dv(const Cfg<T>& c, T n) { return c.beta * gn(c, n); }
  METAUG_HD static inline T d2v(const Cfg<T>&, T) { return T(0); }
};

// The positive side and the negative side of a row run the same loops with different exponents.
template <int FORM, typename T, bool POS>
struct Side {
  using F = Terms<FORM, T>;
  METAUG_HD static inline T e(const Cfg<T>& c, T x) { return POS ? F::u(c, x) : F::v(c, x); }
  METAUG_HD static inline T d1(const Cfg<T>& c, T x) { return POS ? F::du(c, x) : F::dv(c, x); }
  METAUG_HD static inline T d2(const Cfg<T>& c, T x) { return POS ? F::d2u(c, x) : F::d2v(c, x); }
};

template <typename T>
METAUG_HD inline T softplus(T x) {
  return x > T(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

template <typename T>
METAUG_HD inline T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
struct Lse {
  T shift, log_sum;  // LSE = shift + log_sum; kept apart so exp(x - LSE) = exp((x - shift) - log_sum) keeps
                     // the cancellation x - shift exact-ish in fp32 even when |x| is ~β
  METAUG_HD T value() const { return shift + log_sum; }
};

template <typename T>
METAUG_HD inline Lse<T> stat_lse(const T* st, Stat shift, Stat log_sum) {
  return {st[shift], st[log_sum]};
}

// A row's constants for round 2 of the label-mode second derivative, from its stats st, its cotangent g and
// round 1's sums (the OUCL forms: a = Σ⁺ w·u'·U, b = Σ⁻ w·v'·U, w the side's softmax weight; InfoNCE:
// a = Σ⁻ w·U, b = Σ⁺ σ·U, c = Σ⁺ σ', d = Σ⁺ σ'·U): coef, c1, sa, sb and InfoNCE's s_sig, which the tile
// passes read, and d_g = ∂ℓ/∂S·U without the similarity's factor. The CPU's lanes and the CUDA rows kernel
// take them from here.
template <typename T>
struct HvpConsts {
  T coef, c1, sa, sb, s_sig, d_g;
};

template <typename T>
METAUG_HD inline HvpConsts<T> hvp_row_consts(bool infonce, const Cfg<T>& cfg, const T* st, T g, T a, T b, T c,
                                             T d) {
  if (infonce) {
    const T n_pos = st[kNceNPos], s_sig = st[kNceSigmoidSum];
    return {g / n_pos, g * cfg.beta * cfg.beta / n_pos, a, a * c - d - s_sig * a, s_sig,
            cfg.beta / n_pos * (s_sig * a - b)};
  }
  const T y = stat_lse(st, kPosShift, kPosLogSum).value() + stat_lse(st, kNegShift, kNegLogSum).value();
  const T coef = g * cfg.inv_beta * sigmoid(y);
  // sigmoid(-y), not 1 - sigmoid(y): no cancellation.
  return {coef, coef * sigmoid(-y) * (a + b), a, b, T(0), cfg.inv_beta * sigmoid(y) * (a + b)};
}

// log(e^a + e^b) kept as (shift, log_sum); an empty side has log_sum = -inf.
template <typename T>
METAUG_HD inline Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (a.log_sum == ninf) return b;
  if (b.log_sum == ninf) return a;
  const T s = a.shift > b.shift ? a.shift : b.shift;
  return {s, log(exp(a.shift - s + a.log_sum) + exp(b.shift - s + b.log_sum))};
}

// (value, ties) of a running min (MIN) or max merged with another part's; NaN is sticky, as in
// torch.amin/amax.
template <bool MIN, typename T, typename C>
METAUG_HD inline void merge_extremum(T& value, C& ties, T other, C other_ties) {
  if (other_ties == C(0) || value != value) return;
  if (ties == C(0) || other != other || (MIN ? other < value : other > value)) {
    value = other;
    ties = other_ties;
  } else if (other == value) {
    ties += other_ties;
  }
}

// A label-mode row's running state over the reference columns seen so far, whatever the form: the
// log-sum-exps of u(p) and v(n), the hinge's sums (InfoNCE's second sweep keeps Σ softplus(C - βs) and
// Σ σ(C - βs) there), the margins' extrema with their ties, and the counts that decide validity.
template <typename T>
struct RowState {
  Lse<T> pos{T(0), -std::numeric_limits<T>::infinity()};
  Lse<T> neg{T(0), -std::numeric_limits<T>::infinity()};
  T sum_pos = T(0), sum_neg = T(0);
  T min_pos = std::numeric_limits<T>::infinity(), max_neg = -std::numeric_limits<T>::infinity();
  int64_t ties_pos = 0, ties_neg = 0;
  int64_t n_pos = 0, n_neg = 0;
};

template <typename T>
METAUG_HD inline void merge_state(RowState<T>& into, const RowState<T>& part) {
  into.pos = lse_merge(into.pos, part.pos);
  into.neg = lse_merge(into.neg, part.neg);
  into.sum_pos += part.sum_pos;
  into.sum_neg += part.sum_neg;
  merge_extremum<true>(into.min_pos, into.ties_pos, part.min_pos, part.ties_pos);
  merge_extremum<false>(into.max_neg, into.ties_neg, part.max_neg, part.ties_neg);
  into.n_pos += part.n_pos;
  into.n_neg += part.n_neg;
}

// A row's loss and its stats [kStats] from its final state. The parts are written even for an invalid row
// (its loss is 0): a caller that combines partial reference sets (ring mode) needs each part's
// log-sum-exps or sums.
template <typename T>
METAUG_HD inline void finalize_row(const RowState<T>& s, int64_t form, const Cfg<T>& cfg, T& row, T* st) {
  const bool valid = s.n_pos > 0 && s.n_neg > 0;
  T out = T(0);
  for (int64_t k = 0; k < kStats; ++k) st[k] = T(0);
  st[kValid] = valid ? T(1) : T(0);
  if (form == kMargin) {
    st[kPMin] = s.min_pos;
    st[kNMax] = s.max_neg;
    st[kTiesPos] = T(s.ties_pos);
    st[kTiesNeg] = T(s.ties_neg);
  } else if (form == kInfoNCE) {
    st[kNceShift] = s.neg.shift;
    st[kNceLogSum] = s.neg.log_sum;
    st[kNceSigmoidSum] = s.sum_neg;
    st[kNceNPos] = T(s.n_pos);
    out = s.sum_pos / T(s.n_pos);
  } else if (form == kHinge) {
    const T arg = s.sum_neg - s.sum_pos + cfg.lam;
    st[kHingeArg] = arg;
    out = arg > T(0) || arg != arg ? arg : T(0);
  } else {
    st[kPosShift] = s.pos.shift;
    st[kPosLogSum] = s.pos.log_sum;
    st[kNegShift] = s.neg.shift;
    st[kNegLogSum] = s.neg.log_sum;
    out = softplus(s.pos.value() + s.neg.value()) * cfg.inv_beta;
  }
  row = valid ? out : T(0);
}

}  // namespace metaug_fast
