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

// Asks for the K and V rows of the tile starting at key t0 (heads [h0, h1)) while this one is
// computed. Blocks sit in random order in the pool, so the hardware prefetchers lose the
// stream at every block; this keeps a tile's worth of misses in flight ahead of the math.
inline void prefetch_tile(const PagedCache& c, const int32_t* table, int64_t h0, int64_t h1,
                          int64_t t0, int64_t end) {
  const int64_t D = c.head_dim, BS = c.block_size, stride = c.kv_heads * D;
  const int64_t blk = t0 / BS, off = t0 - blk * BS;
  const int64_t n = std::min({end - t0, BS - off, kDecodeTile});
  const int64_t base = (static_cast<int64_t>(table[blk]) * BS + off) * stride + h0 * D;
  const int64_t width = (h1 - h0) * D;  // contiguous floats per token
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < width; d += kLine) {
      __builtin_prefetch(c.k + base + j * stride + d);
      __builtin_prefetch(c.v + base + j * stride + d);
    }
  }
}

template <int DT>
void decode_range_t(const PagedCache& c, const int32_t* table, int64_t h0, int64_t h1,
                    const float* q, int64_t G, int64_t begin, int64_t end, float* m, float* l,
                    float* acc, float* s) {
  const int64_t D = DT ? DT : c.head_dim;
  const int64_t BS = c.block_size, stride = c.kv_heads * D;
  const int64_t rows = (h1 - h0) * G;
  for (int64_t t0 = begin; t0 < end;) {
    // A tile never crosses a block: token j's rows of heads [h0, h1) are one contiguous run,
    // `stride` floats after token j - 1's.
    const int64_t blk = t0 / BS, off = t0 - blk * BS;
    const int64_t n = std::min({end - t0, BS - off, kDecodeTile});
    // 64-bit offsets: block ids times strides overflow int32 on large caches.
    const int64_t base = (static_cast<int64_t>(table[blk]) * BS + off) * stride + h0 * D;
    if (t0 + n < end) prefetch_tile(c, table, h0, h1, t0 + n, end);
    // Scores: each K row (one kv head, one key) is read once for all G query heads sharing
    // it (GQA). Row r = (h - h0) * G + g; its scores at s[r * kDecodeTile + j].
    // (Nested head / group loops rather than r / G: an integer division per dot was a
    // measurable share of the tile's time.)
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = c.k + base + j * stride;
      for (int64_t h = 0, r = 0; h < h1 - h0; ++h, kr += D)
        for (int64_t g = 0; g < G; ++g, ++r) s[r * kDecodeTile + j] = dot<DT>(q + r * D, kr, D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * kDecodeTile;
      float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, sr[j]);
      const float m_new = std::max(m[r], tile_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const float p = exp2_nonpos(sr[j] - m_new);
        sr[j] = p;
        sum += p;
      }
      if (m_new != m[r]) {  // the max moved: rescale what was summed under the old one
        const float alpha = exp2_nonpos(m[r] - m_new);  // 0 for the first tile (m = -inf)
        l[r] *= alpha;
        scale_row<DT>(acc + r * D, alpha, D);
        m[r] = m_new;
      }
      l[r] += sum;
      const int64_t h = r / G;  // once per row and tile, not per key
      accumulate_v<DT>(acc + r * D, sr, c.v + base + h * D, n, stride, D);
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
  int32_t* pos;  // [Rp] position of each row's token (padding rows: -1, nothing valid)

  ExtendScratch(float* base, int64_t Rp, int64_t D) {
    qt = base;
    s = qt + D * Rp;
    m = s + kKeyTile * Rp;
    l = m + Rp;
    alpha = l + Rp;
    acc = alpha + Rp;
    pos = reinterpret_cast<int32_t*>(acc + Rp * D);
  }
};

template <int DT>
void extend_tile_t(const PagedCache& c, const int32_t* table, int64_t kv_head, int64_t G,
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
    const float* kb = c.k + base;
    const float* vb = c.v + base;

    // Scores S[j][r] for the whole key tile: keys past n point at key 0 (always a valid
    // row, so no junk is read) and are masked below.
    for (int64_t rb = 0; rb < Rp; rb += kLanes) {
      for (int64_t j0 = 0; j0 < kKeyTile; j0 += kKeyStep) {
        const float* kr[kKeyStep];
        for (int64_t u = 0; u < kKeyStep; ++u) kr[u] = kb + (j0 + u < n ? j0 + u : 0) * stride;
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
      accumulate_v<DT>(a, p, vb, n, stride, D);
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

void decode_range(const PagedCache& c, const int32_t* table, int64_t h0, int64_t h1,
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

void extend_tile(const PagedCache& c, const int32_t* table, int64_t kv_head, int64_t groups,
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

int64_t extend_tile_tokens(int64_t groups) { return std::max<int64_t>(1, kRows / groups); }

int64_t extend_scratch_floats(int64_t groups, int64_t head_dim, int64_t tokens) {
  const int64_t Rp = round_up(tokens * groups, kLanes);
  // qt + s + m, l, alpha + acc + pos (int32, one float's room each)
  return head_dim * Rp + kKeyTile * Rp + 3 * Rp + Rp * head_dim + Rp;
}

}  // namespace kvmesh
