// SIMD building blocks shared by the CPU kernels: GCC vector types, the per-ISA target attributes and the
// run-time choice of instruction set. Code compiled under DEQKERN_TARGET_* must be inlined from templates
// (DEQKERN_ALWAYS_INLINE) so that it takes the caller's instruction set.
#pragma once

#include <cstring>

namespace deqkern {
namespace cpu {

#if defined(__GNUC__)
#define DEQKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DEQKERN_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define DEQKERN_X86_DISPATCH 1
#define DEQKERN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define DEQKERN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// BYTES bytes of T in one SIMD value; aligned(sizeof(T)) makes loads and stores unaligned-safe.
// (A member typedef: GCC ignores vector attributes on a dependent alias template.)
template <typename T, int BYTES>
struct VecOf {
  typedef T type __attribute__((vector_size(BYTES), aligned(sizeof(T))));
};

// The sum of the lanes of a BYTES-byte vector as a tree of half-width adds (vextract + add): log2(lanes) dependent
// adds instead of the lanes - 1 of a left-to-right loop, which the compiler may not reassociate (no -ffast-math)
// and which dominates short rows. The halves go through memcpy, which GCC turns into register extracts.
template <typename T, int BYTES>
DEQKERN_ALWAYS_INLINE T horizontal_sum(typename VecOf<T, BYTES>::type v) {
  if constexpr (BYTES == sizeof(T)) {
    return v[0];
  } else {
    using Half = typename VecOf<T, BYTES / 2>::type;
    Half lo, hi;
    std::memcpy(&lo, &v, BYTES / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + BYTES / 2, BYTES / 2);
    return horizontal_sum<T, BYTES / 2>(lo + hi);
  }
}

// The widest instruction set this CPU has (2: AVX-512, 1: AVX2+FMA, 0: baseline), asked once.
inline int cpu_isa() {
#ifdef DEQKERN_X86_DISPATCH
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  }();
  return isa;
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace deqkern
