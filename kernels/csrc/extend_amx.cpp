// Extend attention on AMX tiles (contract in extend_amx.h).
//
// Why: a prefill chunk's attention is compute-bound, and the float32 kernel of
// attention_cpu.cpp runs its two products (Q x K^T, P x V) on AVX-512 FMAs at ~110-125
// GFLOP/s on two cores, a quarter of a 256-token prefill step of a small model. A processor
// with AMX-BF16 multiplies 16 x 32 by 32 x 16 bfloat16 tiles in one instruction, an order of
// magnitude more per cycle; oneDNN already runs the linear layers there.
//
// Exactness: the cache is bfloat16 already, so K and V lose nothing. The queries (float32 after
// RoPE) are split into three bfloat16 parts (hi + mid + lo, ~2^-25 of q: an error in a score
// is an error in the exponent, so q needs float32's precision) and the probabilities into two
// (hi + lo, ~2^-17), each part multiplied in turn, so the result stays within the float32
// kernel's error rather than taking a bfloat16 rounding of q and P; the extra tile products
// cost little next to the softmax. Sums accumulate in float32 in the tiles.
//
// Shape of one call: up to 64 query rows (tokens x query heads of one kv head) against keys in
// chunks of 256. Per chunk: scores S = Q K^T into memory (two row blocks x two key blocks per
// pass: four accumulator tiles), an exact softmax update of each row in AVX-512 (running max m,
// sum l, rescale of the row's accumulator when the max moves), then O += P V with the
// accumulators loaded from and stored back to the rows' float32 sums.
#include "extend_amx.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__linux__)
#define KVMESH_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define KVMESH_HAVE_AMX 0
#endif

namespace kvmesh {
namespace {

constexpr int64_t kGroup = 32;    // keys per packed V group: the inner dimension of P x V
constexpr int64_t kChunk = 256;   // keys per softmax pass, at most
constexpr int64_t kMaxRows = 64;  // query rows per call (extend_tile_tokens)
constexpr int64_t kTileElems = 512;  // bfloat16 elements in one 16 x 64-byte tile

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Scratch of one call: queries as bfloat16 hi/mid/lo rows, the chunk's scores, probabilities
// as bfloat16 hi/lo rows, the rows' float32 sums, m and l.
struct AmxScratch {
  uint16_t* q[3];  // [kMaxRows][D] each: the scaled queries as hi + mid + lo
  float* s;       // [kMaxRows][nk]: a chunk of nk <= kChunk keys, rows packed densely
  uint16_t* phi;  // [kMaxRows][nk]
  uint16_t* plo;
  float* acc;     // [kMaxRows][D]
  float* m;       // [kMaxRows]
  float* l;

  AmxScratch(void* base, int64_t D) {
    char* p = static_cast<char*>(base);
    auto take = [&p](int64_t bytes) {
      char* at = p;
      p += round_up(bytes, 64);
      return at;
    };
    for (uint16_t*& part : q) part = reinterpret_cast<uint16_t*>(take(kMaxRows * D * 2));
    s = reinterpret_cast<float*>(take(kMaxRows * kChunk * 4));
    phi = reinterpret_cast<uint16_t*>(take(kMaxRows * kChunk * 2));
    plo = reinterpret_cast<uint16_t*>(take(kMaxRows * kChunk * 2));
    acc = reinterpret_cast<float*>(take(kMaxRows * D * 4));
    m = reinterpret_cast<float*>(take(kMaxRows * 4));
    l = reinterpret_cast<float*>(take(kMaxRows * 4));
  }
  static int64_t bytes(int64_t D) {
    return round_up(kMaxRows * D * 2, 64) * 3 + round_up(kMaxRows * kChunk * 4, 64) +
           round_up(kMaxRows * kChunk * 2, 64) * 2 + round_up(kMaxRows * D * 4, 64) +
           round_up(kMaxRows * 4, 64) * 2;
  }
};

}  // namespace

int64_t amx_packed_elems(int64_t key_begin, int64_t key_end, int64_t head_dim) {
  return round_up(key_end - key_begin, kGroup) * head_dim;
}

int64_t amx_extend_scratch_bytes(int64_t head_dim) { return AmxScratch::bytes(head_dim) + 64; }

// K: tiles of 16 keys x 32 dims, one per (group of 16 keys, 32 dims), as the right-hand
// operand of Q x K^T: element (p, n, e) = K[key n][dim 2p + e], i.e. 32-bit word (p, n) is word
// p of key n's row (a transpose of 32-bit words). V: tiles of 32 keys x 16 dims, one per
// (group of 32 keys, 16 dims), as the right-hand operand of P x V: element (p, n, e) =
// V[key 2p + e][dim n] (two key rows interleaved).
void amx_pack_kv(const PagedCache<uint16_t>& c, const int32_t* table, int64_t kv_head,
                 int64_t key_begin, int64_t key_end, uint16_t* kpack, uint16_t* vpack) {
  const int64_t D = c.head_dim, BS = c.block_size, stride = c.kv_heads * D;
  const int64_t KS = D / 32, DB = D / 16;
  const int64_t keys = round_up(key_end - key_begin, kGroup);
  for (int64_t j = 0; j < keys; ++j) {
    const int64_t t = key_begin + j;
    uint16_t* kt = kpack + (j / 16) * KS * kTileElems + (j % 16) * 2;
    uint16_t* vt = vpack + (j / kGroup) * DB * kTileElems + (j % kGroup / 2) * 32 + j % 2;
    if (t < key_end) {
      const int64_t row = (static_cast<int64_t>(table[t / BS]) * BS + t % BS) * stride +
                          kv_head * D;
      const uint16_t* krow = c.k + row;
      const uint16_t* vrow = c.v + row;
      for (int64_t w = 0; w < D / 2; ++w)  // word w = dims 2w, 2w + 1 -> tile w / 16, p = w % 16
        std::memcpy(kt + (w / 16) * kTileElems + (w % 16) * 32, krow + 2 * w, 4);
      for (int64_t d = 0; d < D; ++d) vt[(d / 16) * kTileElems + (d % 16) * 2] = vrow[d];
    } else {
      for (int64_t w = 0; w < D / 2; ++w)
        std::memset(kt + (w / 16) * kTileElems + (w % 16) * 32, 0, 4);
      for (int64_t d = 0; d < D; ++d) vt[(d / 16) * kTileElems + (d % 16) * 2] = 0;
    }
  }
}

#if KVMESH_HAVE_AMX

namespace {

// ldtilecfg's 64-byte operand: palette 1, tiles 0-7 all 16 rows of 64 bytes (16 float32
// accumulators, or 32 bfloat16 per row for the operands).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = 16;
    }
  }
};

// Scores of rows [0, Rp) (a multiple of 32) against the nk keys (a multiple of 32) of the
// chunk whose first 16-key K tile is `kt`: S[r][j] at s + r * nk + j.
inline void chunk_scores(const AmxScratch& w, const uint16_t* kt, int64_t Rp, int64_t nk,
                         int64_t D) {
  const int64_t KS = D / 32;
  const int64_t kS = nk * static_cast<int64_t>(sizeof(float));
  for (int64_t rb = 0; rb < Rp; rb += 32) {
    for (int64_t kb = 0; kb < nk; kb += 32) {
      const uint16_t* k0 = kt + (kb / 16) * KS * kTileElems;  // keys kb..kb+15
      const uint16_t* k1 = k0 + KS * kTileElems;              // keys kb+16..kb+31
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ks = 0; ks < KS; ++ks) {
        _tile_loadd(6, k0 + ks * kTileElems, 64);
        _tile_loadd(7, k1 + ks * kTileElems, 64);
        for (const uint16_t* part : w.q) {
          _tile_loadd(4, part + rb * D + ks * 32, D * 2);
          _tile_loadd(5, part + (rb + 16) * D + ks * 32, D * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* s = w.s + rb * nk + kb;
      _tile_stored(0, s, kS);
      _tile_stored(1, s + 16, kS);
      _tile_stored(2, s + 16 * nk, kS);
      _tile_stored(3, s + 16 * nk + 16, kS);
    }
  }
}

// acc[rows of the 16-row block rb] += P V over the chunk's ng groups of 32 keys, whose first
// V tile is `vt`.
inline void chunk_values(const AmxScratch& w, const uint16_t* vt, int64_t rb, int64_t ng,
                         int64_t D) {
  const int64_t nk = ng * kGroup;
  const int64_t DB = D / 16;
  for (int64_t db = 0; db < DB; db += 4) {
    float* a = w.acc + rb * D + db * 16;
    _tile_loadd(0, a, D * 4);
    _tile_loadd(1, a + 16, D * 4);
    _tile_loadd(2, a + 32, D * 4);
    _tile_loadd(3, a + 48, D * 4);
    for (int64_t g = 0; g < ng; ++g) {
      _tile_loadd(4, w.phi + rb * nk + g * kGroup, nk * 2);
      _tile_loadd(5, w.plo + rb * nk + g * kGroup, nk * 2);
      const uint16_t* v = vt + (g * DB + db) * kTileElems;
      _tile_loadd(6, v, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(0, 5, 6);
      _tile_loadd(7, v + kTileElems, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(1, 5, 7);
      _tile_loadd(6, v + 2 * kTileElems, 64);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, v + 3 * kTileElems, 64);
      _tile_dpbf16ps(3, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, a, D * 4);
    _tile_stored(1, a + 16, D * 4);
    _tile_stored(2, a + 32, D * 4);
    _tile_stored(3, a + 48, D * 4);
  }
}

// Keys kc0 + j + lane (j + lane < nk) that a row at `pos` may see: [kmin, pos].
inline __mmask16 visible(int64_t kc0, int64_t j, int64_t kmin, int64_t pos) {
  const __m512i key = _mm512_add_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int32_t>(kc0 + j)));
  return _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(kmin))) &
         _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(pos)));
}

// 2^x for x <= 0 in the visible lanes, 0 in the others: n = round(x), 2^(x - n) by the same
// degree-7 Taylor polynomial as exp2_nonpos (cpu_math.h), and vscalefps puts n into the
// exponent (fewer instructions than building the exponent bits by hand).
inline __m512 exp2_visible(__mmask16 visible, __m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));  // below, 2^x is 0 to float32 anyway
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor[0]);
  for (int k = 1; k < kExp2Degree + 1; ++k)
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[k]));
  return _mm512_maskz_scalef_ps(visible, p, n);
}

// 16 bfloat16 at p, widened (cpu_math.h's load16, as an intrinsics vector).
inline __m512 bf16_row(const uint16_t* p) {
  const vec16 v = load16(p);
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// p as bfloat16 hi + lo at hi, lo (16 each): hi rounds p, lo rounds what hi missed.
inline void store_split(__m512 p, uint16_t* hi, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(p);
  const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(p, _mm512_cvtpbh_ps(h)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), reinterpret_cast<const __m256i&>(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), reinterpret_cast<const __m256i&>(l));
}

// The online-softmax update of row r for the chunk's nk keys starting at key kc0 (it sees keys
// [kmin, pos]): turns its scores into probabilities (bfloat16 hi/lo) under the new running
// max, and rescales the row's l and acc if the max moved.
inline void chunk_softmax_row(const AmxScratch& w, int64_t r, int64_t kc0, int64_t nk,
                              int64_t kmin, int64_t pos, int64_t D) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float* s = w.s + r * nk;
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < nk; j += kLanes)
    mx = _mm512_mask_max_ps(mx, visible(kc0, j, kmin, pos), mx, _mm512_loadu_ps(s + j));
  uint16_t* hi = w.phi + r * nk;
  uint16_t* lo = w.plo + r * nk;
  const float m_new = std::max(w.m[r], _mm512_reduce_max_ps(mx));
  if (m_new == kNegInf) {  // nothing visible yet: zero probabilities, state unchanged
    std::memset(hi, 0, nk * 2);
    std::memset(lo, 0, nk * 2);
    return;
  }
  const __m512 m_vec = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; j += kLanes) {
    const __m512 p = exp2_visible(visible(kc0, j, kmin, pos),
                                  _mm512_sub_ps(_mm512_loadu_ps(s + j), m_vec));
    sum = _mm512_add_ps(sum, p);
    store_split(p, hi + j, lo + j);
  }
  const float alpha = exp2_nonpos(w.m[r] - m_new);  // 0 the first time (m = -inf)
  w.l[r] = w.l[r] * alpha + _mm512_reduce_add_ps(sum);
  w.m[r] = m_new;
  if (alpha != 1.f) {
    float* a = w.acc + r * D;
    for (int64_t d = 0; d < D; d += kLanes) store16(a + d, load16(a + d) * alpha);
  }
}

}  // namespace

bool amx_extend_available() {
  static const bool ok = [] {
    const char* env = std::getenv("KVMESH_CPU_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    // Linux hands out the tile state (8 KB per thread) only to processes that ask for it.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

void amx_extend_tile(const uint16_t* kpack, const uint16_t* vpack, int64_t key_begin,
                     int64_t head_dim, int64_t G, const float* q, int64_t q_stride, float* out,
                     int64_t out_stride, int64_t first_pos, int64_t tokens, float qscale,
                     int64_t window, void* scratch) {
  const int64_t D = head_dim, KS = D / 32, DB = D / 16;
  const int64_t R = tokens * G, Rp = round_up(R, 32);
  AmxScratch w(reinterpret_cast<void*>(round_up(reinterpret_cast<int64_t>(scratch), 64)), D);
  for (int64_t r = 0; r < Rp; ++r) {
    const float* qr = q + (r / G) * q_stride + (r % G) * D;
    for (int64_t d = 0; d < D; d += kLanes) {
      const __m512 x = r < R ? _mm512_mul_ps(_mm512_loadu_ps(qr + d), _mm512_set1_ps(qscale))
                             : _mm512_setzero_ps();
      store_split(x, w.q[0] + r * D + d, w.q[1] + r * D + d);
      const __m512 rest = _mm512_sub_ps(_mm512_sub_ps(x, bf16_row(w.q[0] + r * D + d)),
                                        bf16_row(w.q[1] + r * D + d));
      store16(w.q[2] + r * D + d, vec16(rest));  // lo: what hi + mid missed, rounded
    }
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.f;
  }
  std::fill(w.acc, w.acc + Rp * D, 0.f);

  const int64_t last_pos = first_pos + tokens - 1;
  const int64_t lo_key = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  const int64_t g_first = (lo_key - key_begin) / kGroup;
  const int64_t g_end = (last_pos - key_begin) / kGroup + 1;
  static const TileConfig config;
  _tile_loadconfig(&config);
  for (int64_t g0 = g_first; g0 < g_end; g0 += kChunk / kGroup) {
    const int64_t ng = std::min(kChunk / kGroup, g_end - g0), nk = ng * kGroup;
    const int64_t kc0 = key_begin + g0 * kGroup;
    chunk_scores(w, kpack + g0 * 2 * KS * kTileElems, Rp, nk, D);
    // Padding rows get zero probabilities (the softmax writes real rows only).
    std::memset(w.phi + R * nk, 0, (Rp - R) * nk * 2);
    std::memset(w.plo + R * nk, 0, (Rp - R) * nk * 2);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t pos = first_pos + r / G;
      chunk_softmax_row(w, r, kc0, nk, window > 0 ? pos - window + 1 : 0, pos, D);
    }
    for (int64_t rb = 0; rb < R; rb += 16)
      chunk_values(w, vpack + g0 * DB * kTileElems, rb, ng, D);
  }
  _tile_release();

  for (int64_t r = 0; r < R; ++r) {
    float* o = out + (r / G) * out_stride + (r % G) * D;
    const float inv = 1.f / w.l[r];  // l >= 1: every row sees its own key
    const float* a = w.acc + r * D;
    for (int64_t d = 0; d < D; d += kLanes) store16(o + d, load16(a + d) * inv);
  }
}

#else  // no AMX in this build: callers check amx_extend_available() first

bool amx_extend_available() { return false; }

void amx_extend_tile(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, const float*,
                     int64_t, float*, int64_t, int64_t, int64_t, float, int64_t, void*) {
  std::abort();
}

#endif

}  // namespace kvmesh
