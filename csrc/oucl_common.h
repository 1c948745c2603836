// Definitions shared by the CPU (oucl_cpu.cpp) and CUDA (cuda/oucl_cuda.cu) kernels: form and similarity
// ids, the per-row stats layout, the loss parameters, and the exponents u(p), v(n) of each OUCL form with
// their derivatives, callable from host and device code. The ids and the layout are the contracts of
// metaug_fast/contract.py (tests/test_contract_names.py checks that both languages agree).
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define METAUG_HD __host__ __device__
#else
#define METAUG_HD
#endif

namespace metaug_fast {

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

// u(p), v(n) and their first and second derivatives per form. The circle form's Γ weights are
// constants for differentiation (SPEC.md), so its u'' and v'' are zero like the weighted form's.
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

}  // namespace metaug_fast
