// Small vector helpers shared by the CPU kernels: a 16-float GCC vector type, a horizontal sum,
// and a vectorisable 2^x for x <= 0. Header-only (inline) so each kernel inlines them.
//
// The kernels are built with -O3 -march=native but without -ffast-math (see attention_cpu.cpp),
// so these spell out the vectorisation that flag would otherwise buy.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvmesh {

// 2^x for x <= 0 (a score minus a running max), vectorisable. libm's expf is a scalar call
// without -ffast-math, and a decode step does one per (query head, key): at ~10 ns each that
// would cost as much as reading the cache. Round x to an integer n with the 1.5 * 2^23 trick
// (the sum's low mantissa bits hold n), evaluate 2^f on f = x - n in [-0.5, 0.5] by its
// degree-7 Taylor polynomial (truncation error ~5e-9, below float rounding), and put n into
// the exponent. Below -126 (including -inf, a masked score) the result is exactly 0.
inline float exp2_nonpos(float x) {
  const float xc = x < -126.f ? -126.f : x;
  const float shifted = xc + 12582912.f;
  const float n = shifted - 12582912.f;
  const float f = xc - n;
  float p = 1.5252733804059841e-05f;  // ln2^7 / 7!
  p = p * f + 1.5403530393381610e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const int32_t exponent = (bits - 0x4B400000 + 127) << 23;  // n + bias, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &exponent, sizeof two_n);
  return x < -126.f ? 0.f : p * two_n;
}

// 16 floats as one GCC vector (one AVX-512 register, two AVX2 ones); aligned(4): loads from
// anywhere in a row.
constexpr int64_t kLanes = 16;
typedef float vec16 __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16*>(p); }
inline void store16(float* p, vec16 v) { *reinterpret_cast<vec16*>(p) = v; }

// Sum of the lanes as a halving tree (4 shuffle+add steps). Without -ffast-math the compiler
// may not reassociate, so an `omp simd` reduction ends in 16 serially dependent scalar adds:
// that chain, once per (query head, key), was the decode kernel's bottleneck.
inline float hsum(vec16 v) {
  const vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                 __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

}  // namespace kvmesh
