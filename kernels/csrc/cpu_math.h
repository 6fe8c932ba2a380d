// Small vector helpers shared by the CPU kernels: a 16-float GCC vector type, a horizontal sum,
// a vectorisable 2^x for x <= 0, a prefetch the vectoriser keeps, and bfloat16 (stored as
// uint16_t) to and from float. Header-only (inline) so each kernel inlines them.
//
// The kernels are built with -O3 -march=native but without -ffast-math (see attention_cpu.cpp),
// so these spell out the vectorisation that flag would otherwise buy.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kvmesh {

// Asks for the cache line at p, into L2 (prefetcht1). Not __builtin_prefetch: GCC's
// vectoriser deletes prefetch calls from the loops it vectorises (GCC 12 kept none of the
// decode kernel's), and inline assembly is opaque to it.
inline void prefetch_l2(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// 2^x for x <= 0 (a score minus a running max), vectorisable. libm's expf is a scalar call
// without -ffast-math, and a decode step does one per (query head, key): at ~10 ns each that
// would cost as much as reading the cache. Round x to an integer n with the 1.5 * 2^23 trick
// (the sum's low mantissa bits hold n), evaluate 2^f on f = x - n in [-0.5, 0.5] by its
// degree-7 Taylor polynomial (truncation error ~5e-9, below float rounding), and put n into
// the exponent. Below -126 (including -inf, a masked score) the result is exactly 0.
// V: float, or a vector of floats (GCC vector extension) with I the same-shaped int32 vector:
// each lane computes what the scalar does.
// 2^f for f in [-0.5, 0.5]: the Taylor coefficients ln2^k / k!, highest degree first (Horner).
constexpr int kExp2Degree = 7;
constexpr float kExp2Taylor[kExp2Degree + 1] = {
    1.5252733804059841e-05f, 1.5403530393381610e-04f, 1.3333558146428443e-03f,
    9.6181291076284772e-03f, 5.5504108664821580e-02f, 2.4022650695910071e-01f,
    6.9314718055994531e-01f, 1.f};

template <class V, class I>
inline V exp2_nonpos_lanes(V x) {
  const V zero = V{};
  const V xc = x < -126.f ? zero - 126.f : x;
  const V shifted = xc + 12582912.f;
  const V n = shifted - 12582912.f;
  const V f = xc - n;
  V p = zero + kExp2Taylor[0];
  for (int k = 1; k < kExp2Degree + 1; ++k) p = p * f + kExp2Taylor[k];
  I bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const I exponent = (bits - 0x4B400000 + 127) << 23;  // n + bias, n in [-126, 0]
  V two_n;
  std::memcpy(&two_n, &exponent, sizeof two_n);
  return x < -126.f ? zero : p * two_n;
}

inline float exp2_nonpos(float x) { return exp2_nonpos_lanes<float, int32_t>(x); }

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

// hsum of 16 vectors at once: out[j] = hsum(v[kBitReversed[j]]), bit for bit (the same adds in
// the same order), as a transpose-and-add tree: 15 shuffle pairs and 15 adds for 16 sums
// instead of 16 halving trees of 4 steps each. Each level adds lane i of a vector to lane i + w
// and packs two vectors' halves into one; the lanes come out in bit-reversed order.
constexpr int kBitReversed[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
inline vec16 hsum16(const vec16* v) {
  vec16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9,
                                   10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                   14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                 15, 31);
}

// bfloat16 <-> float as torch converts: widening is exact (the bits move to the top half);
// narrowing rounds to nearest even, and a NaN stays a NaN.
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (f != f) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// One element of either storage dtype, as float.
inline float load_elem(float v) { return v; }
inline float load_elem(uint16_t v) { return bf16_to_float(v); }

// 16 bfloat16 widened to 16 floats: a zero-extend and a shift (vpmovzxwd + vpslld), so a
// bfloat16 row costs little more to read than a float32 one, and half the bytes.
inline vec16 load16(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  typedef uint16_t u16x16 __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));
  typedef uint32_t u32x16 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  const u32x16 f = __builtin_convertvector(*reinterpret_cast<const u16x16*>(p), u32x16) << 16;
#endif
  vec16 v;
  std::memcpy(&v, &f, sizeof v);  // a bit cast: no instruction
  return v;
}

// 16 floats narrowed to bfloat16 as float_to_bf16 rounds (nearest even; a NaN stays a NaN,
// with the instruction's own NaN bits): one instruction with AVX512-BF16, else integer vectors.
inline void store16(uint16_t* p, vec16 v) {
#if defined(__AVX512BF16__)
  __m512 f;
  std::memcpy(&f, &v, sizeof f);
  const __m256bh h = _mm512_cvtneps_pbh(f);
  std::memcpy(p, &h, sizeof h);
#else
  typedef uint32_t u32x16 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  typedef uint16_t u16x16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  u32x16 u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  u = v != v ? 0x7FC0u : u;
  const u16x16 h = __builtin_convertvector(u, u16x16);
  std::memcpy(p, &h, sizeof h);
#endif
}

// exp2_nonpos on 16 lanes: the same arithmetic, lane by lane (so the same values).
inline vec16 exp2_nonpos16(vec16 x) {
  typedef int32_t i32x16 __attribute__((vector_size(kLanes * sizeof(int32_t))));
  return exp2_nonpos_lanes<vec16, i32x16>(x);
}

// n bfloat16 widened to float32 at dst.
inline void widen_bf16(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store16(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

}  // namespace kvmesh
