// One-pass paged attention kernels for CPUs (see attention_cpu.h for the contract).
//
// Why one pass: decode attention is memory-bound (each K and V element is used for a handful
// of multiply-adds), so what matters is reading the cache once, at full bandwidth, with
// little work per byte. The previous kernel made one pass over K to build a score row per
// head, a softmax pass, then one pass over V; this one walks each sequence's blocks once and,
// for every tile of keys, does the scores of all query heads that share a kv head, the
// online-softmax update and the V accumulation while the tile is still in L1.
//
// Extend (a chunk of new tokens over a cached prefix) is compute-bound instead: there the
// point is a register-blocked score micro-kernel and no gathered copy of K/V or mask tensor.
//
// Built with -O3 -march=native -fopenmp but without -ffast-math: `omp simd` pragmas and GCC
// vector types (which Clang understands too) give the vectorisation fast-math would, without
// letting the compiler reorder the rest of the arithmetic.
#include "attention_cpu.h"
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace kvmesh {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// DT > 0: the head dimension is a compile-time constant (64 and 128 are instantiated), so
// these loops unroll into straight vector code; DT = 0 reads it at run time.
template <int DT>
inline float dot(const float* a, const float* b, int64_t d_rt) {
  if constexpr (DT > 0 && DT % kLanes == 0) {
    vec16 acc = load16(a) * load16(b);
    for (int64_t i = kLanes; i < DT; i += kLanes) acc += load16(a + i) * load16(b + i);
    return hsum(acc);
  } else {
    const int64_t D = DT ? DT : d_rt;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
    return s;
  }
}

template <int DT>
inline void axpy(float* __restrict__ y, float a, const float* __restrict__ x, int64_t d_rt) {
  const int64_t D = DT ? DT : d_rt;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) y[i] += a * x[i];
}

template <int DT>
inline void scale_row(float* y, float a, int64_t d_rt) {
  const int64_t D = DT ? DT : d_rt;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) y[i] *= a;
}

// n rows of one kv head's K or V (`stride` elements apart) as float32 rows: a float32 cache's
// own rows, or a bfloat16 cache's widened once into `buf` (D apart), so the float32 code that
// reads each row several times (once per query head sharing it) does not widen it each time.
struct FloatRows {
  const float* p;
  int64_t stride;
};
template <class T>
inline FloatRows float_rows(const T* rows, int64_t n, int64_t stride, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return {rows, stride};
  } else {
    for (int64_t j = 0; j < n; ++j) widen_bf16(rows + j * stride, buf + j * D, D);
    return {buf, D};
  }
}

// acc[0:D] += sum over j < n of p[j] * v[j * stride : j * stride + D]. With a fixed D the
// row of acc stays in registers for the whole tile (V rows come from L1 after the first
// query head of the group).
template <int DT>
inline void accumulate_v(float* __restrict__ acc, const float* __restrict__ p,
                         const float* __restrict__ v, int64_t n, int64_t stride, int64_t d_rt) {
  if constexpr (DT > 0 && DT % kLanes == 0) {
    constexpr int64_t NV = DT / kLanes;
    vec16 a[NV];
    for (int64_t i = 0; i < NV; ++i) a[i] = load16(acc + i * kLanes);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* vr = v + j * stride;
      for (int64_t i = 0; i < NV; ++i) a[i] += pj * load16(vr + i * kLanes);
    }
    for (int64_t i = 0; i < NV; ++i) store16(acc + i * kLanes, a[i]);
  } else {
    for (int64_t j = 0; j < n; ++j) axpy<DT>(acc, p[j], v + j * stride, d_rt);
  }
}

// Keys in the decode tile that starts at key t0: a tile never crosses a block, so token j's
// rows of heads [h0, h1) are one contiguous run, `stride` elements after token j - 1's.
template <class T>
inline int64_t tile_length(const PagedCache<T>& c, int64_t t0, int64_t end) {
  return std::min({end - t0, c.block_size - t0 % c.block_size, kDecodeTile});
}

// Asks for the K and V rows of the tile starting at key t0 (heads [h0, h1)), into L2. Blocks
// sit in random order in the pool, so the hardware prefetchers lose the stream at every
// block. Into L2, not L1: the tile being computed fills most of L1, and a tile prefetched
// into it would evict that tile's V before it is read.
template <class T>
inline void prefetch_tile(const PagedCache<T>& c, const int32_t* table, int64_t h0, int64_t h1,
                          int64_t t0, int64_t end) {
  const int64_t D = c.head_dim, BS = c.block_size, stride = c.kv_heads * D;
  const int64_t blk = t0 / BS, off = t0 - blk * BS;
  const int64_t n = tile_length(c, t0, end);
  const int64_t base = (static_cast<int64_t>(table[blk]) * BS + off) * stride + h0 * D;
  const int64_t width = (h1 - h0) * D;  // contiguous elements per token
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < width; d += kLine) {
      prefetch_l2(c.k + base + j * stride + d);
      prefetch_l2(c.v + base + j * stride + d);
    }
  }
}

// The online-softmax update of one row for a tile of n scores: turns sr[0:n] into
// probabilities under the new running max, rescales the row's l and acc if the max moved.
template <int DT>
inline void softmax_tile(float* sr, int64_t n, float& m, float& l, float* acc, int64_t D) {
  float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, sr[j]);
  const float m_new = std::max(m, tile_max);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp2_nonpos(sr[j] - m_new);
    sr[j] = p;
    sum += p;
  }
  if (m_new != m) {  // the max moved: rescale what was summed under the old one
    const float alpha = exp2_nonpos(m - m_new);  // 0 for the first tile (m = -inf)
    l *= alpha;
    scale_row<DT>(acc, alpha, D);
    m = m_new;
  }
  l += sum;
}

// Head dims that are whole vectors: each K and V row of the tile is loaded (and, from a
// bfloat16 cache, widened) into registers once and used by all G query heads sharing it.
// V is accumulated into ROWS query rows at a time, ROWS x NV accumulators in registers.
template <int NV, int ROWS, class T>
inline void accumulate_v_rows(float* acc, const float* p, const T* v, int64_t n, int64_t stride) {
  constexpr int64_t D = NV * kLanes;
  vec16 a[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < NV; ++i) a[r][i] = load16(acc + r * D + i * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vec16 vr[NV];
    for (int i = 0; i < NV; ++i) vr[i] = load16(v + j * stride + i * kLanes);
    for (int r = 0; r < ROWS; ++r) {
      const float pj = p[r * kDecodeTile + j];
      for (int i = 0; i < NV; ++i) a[r][i] += pj * vr[i];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < NV; ++i) store16(acc + r * D + i * kLanes, a[r][i]);
}

// q[0:D] * k[0:D] lane by lane, summed over the D / 16 vectors (hsum finishes the dot product).
template <int NV, class T>
inline vec16 dot_lanes(const float* q, const T* k) {
  vec16 d = load16(q) * load16(k);
  for (int i = 1; i < NV; ++i) d += load16(q + i * kLanes) * load16(k + i * kLanes);
  return d;
}

#if defined(__AVX512BF16__)
// A bfloat16 cache's scores with AVX512-BF16's pair dot product (vdpbf16ps): K's bfloat16 rows
// multiply a bfloat16 copy of the query without being widened, which is most of what a
// bfloat16 decode tile spends when K is read once per query head sharing it. The query goes in
// as three bfloat16 parts, hi = bf16(q), mid = bf16(q - hi), lo = bf16(q - hi - mid), which
// hold q to ~2^-27 relative; a product of two bfloat16 is exact in float32, so each score
// differs from the float32-arithmetic path only in the order of its float32 sums. Two parts
// (q to ~2^-18) were not enough: at head dim 128 a score's error reached ~1e-5 and an output
// left the kernels' 2e-5 agreement with the torch twin (a randomised kernel test found it).
constexpr bool kBf16Dot = true;

inline __m512bh load_bh(const uint16_t* p) {
  const __m512i bits = _mm512_loadu_si512(p);
  __m512bh v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The bfloat16 parts of the query's rows x D floats: all hi parts, then all mid, then all lo.
constexpr int kQueryParts = 3;
inline void split_query_bf16(const float* q, int64_t rows, int64_t D, uint16_t* out) {
  const int64_t n = rows * D;
  for (int64_t i = 0; i < n; ++i) {
    float rest = q[i];
    for (int part = 0; part < kQueryParts; ++part) {
      const uint16_t bits = float_to_bf16(rest);
      out[part * n + i] = bits;
      rest -= bf16_to_float(bits);
    }
  }
}

// Lane partials of q . k over D = NV * 16 elements (hsum finishes the dot product); `qpart`
// points at the row's hi part, the other parts `part_stride` elements apart.
template <int NV>
inline vec16 dot_lanes_bf16(const uint16_t* qpart, int64_t part_stride, const uint16_t* k) {
  static_assert(NV % 2 == 0, "whole 32-element bfloat16 vectors");
  __m512 d = _mm512_setzero_ps();
  for (int i = 0; i < NV / 2; ++i) {
    const __m512bh kv = load_bh(k + 32 * i);
    for (int part = 0; part < kQueryParts; ++part)
      d = _mm512_dpbf16_ps(d, kv, load_bh(qpart + part * part_stride + 32 * i));
  }
  vec16 out;
  std::memcpy(&out, &d, sizeof out);
  return out;
}
#else
constexpr bool kBf16Dot = false;
#endif

// Whether a tile of this cache type and head dimension takes its scores from the pair dot
// product (then the caller passes the query's bfloat16 parts as `qsplit`).
template <int NV, class T>
constexpr bool uses_bf16_dot() {
  return kBf16Dot && std::is_same_v<T, uint16_t> && NV % 2 == 0;
}

// One tile of n keys for kv heads [0, heads) of a token row `stride` elements long, query rows
// r = h * G + g (q at q + r * D, scores at s[r * kDecodeTile + j]). `qsplit`: the query rows'
// bfloat16 parts (split_query_bf16) where uses_bf16_dot, else unused.
template <int NV, class T>
inline void decode_tile_fast(const T* k, const T* v, int64_t n, int64_t stride, int64_t heads,
                             const float* q, [[maybe_unused]] const uint16_t* qsplit, int64_t G,
                             float* s, float* m, float* l, float* acc) {
  constexpr int64_t D = NV * kLanes;
  // Scores row by row, 16 keys at a time: their dot products' lane vectors are summed together
  // by hsum16, bit-identical to one hsum each at a third of the shuffles. A K row is read
  // once per query head sharing it, from L1 after the first.
  for (int64_t h = 0, r = 0; h < heads; ++h) {
    const T* kh = k + h * D;
    for (int64_t g = 0; g < G; ++g, ++r) {
      const float* qr = q + r * D;
      float* sr = s + r * kDecodeTile;
      int64_t j = 0;
#if defined(__AVX512BF16__)
      if constexpr (uses_bf16_dot<NV, T>()) {
        const uint16_t* qr16 = qsplit + r * D;
        const int64_t parts_apart = heads * G * D;
        for (; j + kLanes <= n; j += kLanes) {
          vec16 dots[kLanes];
          for (int t = 0; t < kLanes; ++t)
            dots[kBitReversed[t]] = dot_lanes_bf16<NV>(qr16, parts_apart, kh + (j + t) * stride);
          store16(sr + j, hsum16(dots));
        }
        for (; j < n; ++j) sr[j] = hsum(dot_lanes_bf16<NV>(qr16, parts_apart, kh + j * stride));
        continue;
      }
#endif
      for (; j + kLanes <= n; j += kLanes) {
        vec16 dots[kLanes];
        for (int t = 0; t < kLanes; ++t)
          dots[kBitReversed[t]] = dot_lanes<NV>(qr, kh + (j + t) * stride);
        store16(sr + j, hsum16(dots));
      }
      for (; j < n; ++j) sr[j] = hsum(dot_lanes<NV>(qr, kh + j * stride));
    }
  }
  for (int64_t r = 0; r < heads * G; ++r)
    softmax_tile<D>(s + r * kDecodeTile, n, m[r], l[r], acc + r * D, D);
  // Up to kRows rows per pass over V: kRows x NV accumulators and NV V registers of the 32.
  constexpr int64_t kRows = NV <= 4 ? 4 : 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* vh = v + h * D;
    for (int64_t r = h * G, last = (h + 1) * G; r < last;) {
      const int64_t rows = std::min(kRows, last - r);
      float* a = acc + r * D;
      const float* p = s + r * kDecodeTile;
      switch (rows) {
        case 4:
          if constexpr (kRows >= 4) accumulate_v_rows<NV, 4>(a, p, vh, n, stride);
          break;
        case 3:
          if constexpr (kRows >= 3) accumulate_v_rows<NV, 3>(a, p, vh, n, stride);
          break;
        case 2:
          accumulate_v_rows<NV, 2>(a, p, vh, n, stride);
          break;
        default:
          accumulate_v_rows<NV, 1>(a, p, vh, n, stride);
      }
      r += rows;
    }
  }
}

template <int DT, class T>
void decode_range_t(const PagedCache<T>& c, const int32_t* table, int64_t h0, int64_t h1,
                    const float* q, int64_t G, int64_t begin, int64_t end, float* m, float* l,
                    float* acc, float* s) {
  const int64_t D = DT ? DT : c.head_dim;
  const int64_t BS = c.block_size, stride = c.kv_heads * D;
  float* kbuf = s + (h1 - h0) * G * kDecodeTile;  // generic path: a bfloat16 tile, widened
  float* vbuf = kbuf + kDecodeTile * D;
  // Pair-dot path: the query's bfloat16 parts, in the room the generic path widens into.
  uint16_t* qsplit = reinterpret_cast<uint16_t*>(kbuf);
#if defined(__AVX512BF16__)
  if constexpr (DT > 0 && DT % kLanes == 0 && uses_bf16_dot<DT / kLanes, T>())
    split_query_bf16(q, (h1 - h0) * G, D, qsplit);
#endif
  for (int64_t t0 = begin; t0 < end;) {
    const int64_t blk = t0 / BS, off = t0 - blk * BS;
    const int64_t n = tile_length(c, t0, end);
    // 64-bit offsets: block ids times strides overflow int32 on large caches.
    const int64_t base = (static_cast<int64_t>(table[blk]) * BS + off) * stride + h0 * D;
    // The next two tiles, every tile: each is asked for twice, two tiles ahead and again one
    // ahead (asking once, or one tile ahead, gained about half as much). Measured on a
    // 2-core AMD EPYC (Zen 4), 10 layers of 64 sequences x 512 keys, blocks scattered
    // through the pool as they are after a while of serving: 1.3x faster per call, float32
    // and bfloat16; blocks in order (a fresh pool) 1.05-1.1x.
    if (t0 + n < end) {
      const int64_t next = tile_length(c, t0 + n, end);
      if (t0 + n + next < end) prefetch_tile(c, table, h0, h1, t0 + n + next, end);
      prefetch_tile(c, table, h0, h1, t0 + n, end);
    }
    // Query heads h * G + g share kv head h (GQA): row r = h * G + g, scores at
    // s[r * kDecodeTile + j].
    if constexpr (DT > 0 && DT % kLanes == 0) {
      decode_tile_fast<DT / kLanes>(c.k + base, c.v + base, n, stride, h1 - h0, q, qsplit, G, s,
                                    m, l, acc);
    } else {
      for (int64_t h = 0; h < h1 - h0; ++h) {
        const int64_t r0 = h * G;
        const FloatRows k = float_rows(c.k + base + h * D, n, stride, D, kbuf);
        const FloatRows v = float_rows(c.v + base + h * D, n, stride, D, vbuf);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = r0; r < r0 + G; ++r)
            s[r * kDecodeTile + j] = dot<DT>(q + r * D, k.p + j * k.stride, D);
        for (int64_t r = r0; r < r0 + G; ++r) {
          softmax_tile<DT>(s + r * kDecodeTile, n, m[r], l[r], acc + r * D, D);
          accumulate_v<DT>(acc + r * D, s + r * kDecodeTile, v.p, n, v.stride, D);
        }
      }
    }
    t0 += n;
  }
}

// ---- extend -----------------------------------------------------------------------------
// A query tile holds up to kRows rows (tokens x query heads of one kv head); a key tile up to
// kKeyTile keys. Scores are computed with the queries transposed (Qt[d][row]), so one key
// element broadcast against a vector of 16 rows is one FMA: K is read straight from the cache
// and never transposed, and the softmax bookkeeping runs across rows in vector lanes too.
constexpr int64_t kRows = 64;
constexpr int64_t kKeyTile = 16;
constexpr int64_t kKeyStep = 8;  // keys per micro-kernel pass: 8 independent FMA chains
static_assert(kKeyTile % kKeyStep == 0, "key tile must be whole micro-kernel passes");


inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct ExtendScratch {
  float* qt;     // [D][Rp] queries, transposed and scaled
  float* s;      // [kKeyTile][Rp] scores, then probabilities
  float* m;      // [Rp]
  float* l;      // [Rp]
  float* alpha;  // [Rp]
  float* acc;    // [Rp][D]
  float* kt;     // [kKeyTile][D] a bfloat16 key tile, widened
  float* vt;     // [kKeyTile][D] its values
  int32_t* pos;  // [Rp] position of each row's token (padding rows: -1, nothing valid)

  ExtendScratch(float* base, int64_t Rp, int64_t D) {
    qt = base;
    s = qt + D * Rp;
    m = s + kKeyTile * Rp;
    l = m + Rp;
    alpha = l + Rp;
    acc = alpha + Rp;
    kt = acc + Rp * D;
    vt = kt + kKeyTile * D;
    pos = reinterpret_cast<int32_t*>(vt + kKeyTile * D);
  }
};

template <int DT, class T>
void extend_tile_t(const PagedCache<T>& c, const int32_t* table, int64_t kv_head, int64_t G,
                   const float* q, int64_t q_stride, float* out, int64_t out_stride,
                   int64_t first_pos, int64_t tokens, float qscale, int64_t window,
                   float* scratch) {
  const int64_t D = DT ? DT : c.head_dim;
  const int64_t BS = c.block_size, stride = c.kv_heads * D;
  const int64_t R = tokens * G, Rp = round_up(R, kLanes);
  ExtendScratch w(scratch, Rp, D);
  for (int64_t r = 0; r < Rp; ++r) {
    const bool real = r < R;
    const float* qr = q + (r / G) * q_stride + (r % G) * D;
    for (int64_t d = 0; d < D; ++d) w.qt[d * Rp + r] = real ? qr[d] * qscale : 0.f;
    w.pos[r] = real ? static_cast<int32_t>(first_pos + r / G) : -1;
    w.m[r] = kNegInf;
    w.l[r] = 0.f;
  }
  std::fill(w.acc, w.acc + Rp * D, 0.f);

  const int64_t last_pos = first_pos + tokens - 1;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  for (int64_t t0 = lo; t0 <= last_pos;) {
    const int64_t blk = t0 / BS, off = t0 - blk * BS;
    const int64_t n = std::min({last_pos + 1 - t0, BS - off, kKeyTile});
    const int64_t base = (static_cast<int64_t>(table[blk]) * BS + off) * stride + kv_head * D;
    const FloatRows k = float_rows(c.k + base, n, stride, D, w.kt);
    const FloatRows v = float_rows(c.v + base, n, stride, D, w.vt);

    // Scores S[j][r] for the whole key tile: keys past n point at key 0 (always a valid
    // row, so no junk is read) and are masked below.
    for (int64_t rb = 0; rb < Rp; rb += kLanes) {
      for (int64_t j0 = 0; j0 < kKeyTile; j0 += kKeyStep) {
        const float* kr[kKeyStep];
        for (int64_t u = 0; u < kKeyStep; ++u) kr[u] = k.p + (j0 + u < n ? j0 + u : 0) * k.stride;
        vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
        const float* qcol = w.qt + rb;
        for (int64_t d = 0; d < D; ++d) {
          const vec16 qv = load16(qcol + d * Rp);
          a0 += kr[0][d] * qv;
          a1 += kr[1][d] * qv;
          a2 += kr[2][d] * qv;
          a3 += kr[3][d] * qv;
          a4 += kr[4][d] * qv;
          a5 += kr[5][d] * qv;
          a6 += kr[6][d] * qv;
          a7 += kr[7][d] * qv;
        }
        float* srow = w.s + j0 * Rp + rb;
        store16(srow + 0 * Rp, a0);
        store16(srow + 1 * Rp, a1);
        store16(srow + 2 * Rp, a2);
        store16(srow + 3 * Rp, a3);
        store16(srow + 4 * Rp, a4);
        store16(srow + 5 * Rp, a5);
        store16(srow + 6 * Rp, a6);
        store16(srow + 7 * Rp, a7);
      }
    }

    // Causal (bottom-right aligned: a row sees keys up to its own position) and sliding-window
    // mask, then the online-softmax update, all across rows in vector lanes.
    for (int64_t r = 0; r < Rp; ++r) w.alpha[r] = kNegInf;  // tile max for now
    for (int64_t j = 0; j < n; ++j) {
      const int32_t key = static_cast<int32_t>(t0 + j);
      float* sj = w.s + j * Rp;
#pragma omp simd
      for (int64_t r = 0; r < Rp; ++r) {
        const bool ok = key <= w.pos[r] && (window <= 0 || key > w.pos[r] - window);
        sj[r] = ok ? sj[r] : kNegInf;
        w.alpha[r] = std::max(w.alpha[r], sj[r]);
      }
    }
#pragma omp simd
    for (int64_t r = 0; r < Rp; ++r) {
      const float m_new = std::max(w.m[r], w.alpha[r]);
      // A row that has seen no valid key yet keeps m = -inf; subtract 0 instead so that
      // -inf - -inf never makes a NaN (its probabilities are exactly 0 either way).
      const float ref = m_new == kNegInf ? 0.f : m_new;
      w.alpha[r] = exp2_nonpos(w.m[r] - ref);
      w.m[r] = m_new;
    }
    for (int64_t j = 0; j < n; ++j) {
      float* sj = w.s + j * Rp;
#pragma omp simd
      for (int64_t r = 0; r < Rp; ++r) {
        const float ref = w.m[r] == kNegInf ? 0.f : w.m[r];
        sj[r] = exp2_nonpos(sj[r] - ref);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float p[kKeyTile];
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = w.s[j * Rp + r];
        sum += p[j];
      }
      w.l[r] = w.l[r] * w.alpha[r] + sum;
      float* a = w.acc + r * D;
      if (w.alpha[r] != 1.f) scale_row<DT>(a, w.alpha[r], D);
      accumulate_v<DT>(a, p, v.p, n, v.stride, D);
    }
    t0 += n;
  }

  for (int64_t r = 0; r < R; ++r) {
    float* o = out + (r / G) * out_stride + (r % G) * D;
    const float inv = 1.f / w.l[r];  // l >= 1: every row sees its own key
    const float* a = w.acc + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
  }
}

}  // namespace

template <class T>
void decode_range(const PagedCache<T>& c, const int32_t* table, int64_t h0, int64_t h1,
                  const float* q, int64_t groups, int64_t begin, int64_t end, float* m, float* l,
                  float* acc, float* scratch) {
  switch (c.head_dim) {
    case 64:
      return decode_range_t<64>(c, table, h0, h1, q, groups, begin, end, m, l, acc, scratch);
    case 128:
      return decode_range_t<128>(c, table, h0, h1, q, groups, begin, end, m, l, acc, scratch);
    default:
      return decode_range_t<0>(c, table, h0, h1, q, groups, begin, end, m, l, acc, scratch);
  }
}

void merge_partials(int64_t parts, int64_t rows, int64_t head_dim, const float* m,
                    const float* l, const float* acc, float* out) {
  const int64_t D = head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    float m_all = kNegInf;
    for (int64_t p = 0; p < parts; ++p) m_all = std::max(m_all, m[p * rows + r]);
    float* o = out + r * D;
    std::fill(o, o + D, 0.f);
    float l_all = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      const float w = exp2_nonpos(m[p * rows + r] - m_all);  // an empty part (-inf) weighs 0
      l_all += w * l[p * rows + r];
      axpy<0>(o, w, acc + (p * rows + r) * D, D);
    }
    scale_row<0>(o, 1.f / l_all, D);
  }
}

template <class T>
void extend_tile(const PagedCache<T>& c, const int32_t* table, int64_t kv_head, int64_t groups,
                 const float* q, int64_t q_stride, float* out, int64_t out_stride,
                 int64_t first_pos, int64_t tokens, float qscale, int64_t window,
                 float* scratch) {
  switch (c.head_dim) {
    case 64:
      return extend_tile_t<64>(c, table, kv_head, groups, q, q_stride, out, out_stride,
                               first_pos, tokens, qscale, window, scratch);
    case 128:
      return extend_tile_t<128>(c, table, kv_head, groups, q, q_stride, out, out_stride,
                                first_pos, tokens, qscale, window, scratch);
    default:
      return extend_tile_t<0>(c, table, kv_head, groups, q, q_stride, out, out_stride,
                              first_pos, tokens, qscale, window, scratch);
  }
}

// The two cache dtypes the bindings use.
template void decode_range(const PagedCache<float>&, const int32_t*, int64_t, int64_t,
                           const float*, int64_t, int64_t, int64_t, float*, float*, float*,
                           float*);
template void decode_range(const PagedCache<uint16_t>&, const int32_t*, int64_t, int64_t,
                           const float*, int64_t, int64_t, int64_t, float*, float*, float*,
                           float*);
template void extend_tile(const PagedCache<float>&, const int32_t*, int64_t, int64_t,
                          const float*, int64_t, float*, int64_t, int64_t, int64_t, float, int64_t,
                          float*);
template void extend_tile(const PagedCache<uint16_t>&, const int32_t*, int64_t, int64_t,
                          const float*, int64_t, float*, int64_t, int64_t, int64_t, float, int64_t,
                          float*);

int64_t extend_tile_tokens(int64_t groups) { return std::max<int64_t>(1, kRows / groups); }

int64_t extend_scratch_floats(int64_t groups, int64_t head_dim, int64_t tokens) {
  const int64_t Rp = round_up(tokens * groups, kLanes);
  // qt + s + m, l, alpha + acc + kt, vt + pos (int32, one float's room each)
  return head_dim * Rp + kKeyTile * Rp + 3 * Rp + Rp * head_dim + 2 * kKeyTile * head_dim + Rp;
}

}  // namespace kvmesh
