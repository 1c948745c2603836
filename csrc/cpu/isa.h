// One copy of the CPU row kernels per instruction set, picked at run time. A .cpp file defines
// METAUG_ROWS as the .inc that holds its row kernels and includes compile_per_isa.inc, which compiles that
// source into the namespaces isa_avx512, isa_avx2 (x86-64 GCC only) and isa_base; METAUG_ISA_SWITCH(BODY)
// then runs BODY with `ns` naming the namespace of the machine's best instruction set.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define METAUG_MULTI_ISA 1
#define METAUG_IF_MULTI(...) __VA_ARGS__
#else
#define METAUG_IF_MULTI(...)
#endif

namespace metaug_fast {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa detect_isa() {
#ifdef METAUG_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace metaug_fast

#define METAUG_ISA_SWITCH(...)                                                       \
  switch (active_isa()) {                                                            \
    case Isa::kAvx512: { METAUG_IF_MULTI(namespace ns = isa_avx512; __VA_ARGS__) } break; \
    case Isa::kAvx2: { METAUG_IF_MULTI(namespace ns = isa_avx2; __VA_ARGS__) } break;     \
    case Isa::kBase: { namespace ns = isa_base; __VA_ARGS__ } break;                       \
  }
