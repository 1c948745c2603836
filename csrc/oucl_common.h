// Definitions shared by the CPU (oucl_cpu.cpp) and CUDA (cuda/oucl_cuda.cu) kernels: form ids, the
// per-row stats layout, the loss parameters, and the exponents u(p), v(n) of each OUCL form with their
// derivatives (SPEC.md section 3), callable from host and device code.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define METAUG_HD __host__ __device__
#else
#define METAUG_HD
#endif

namespace metaug_fast {

// kInfoNCE runs InfoNCE on the same machinery with β = 1/τ; kMargin computes margin statistics (label mode).
enum FormId : int64_t { kHinge = 0, kSquared = 1, kWeighted = 2, kCircle = 3, kInfoNCE = 4, kMargin = 5 };
constexpr int64_t kStats = 5;  // per-row values saved by the forward, layout in oucl_rows.inc

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
