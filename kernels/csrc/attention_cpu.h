// Paged attention for CPUs: the kernels themselves, on plain pointers.
//
// This header and attention_cpu.cpp know nothing of torch, so that translation unit compiles
// in a couple of seconds; paged_decode_cpu.cpp holds the torch bindings (argument checks,
// work split, threads). Every kernel here is one pass over K and V with an online softmax:
// scores live in log2 units (the queries come pre-multiplied by scale * log2(e)), each tile
// of keys updates a running max `m`, a running sum `l` of 2^(s - m) and an unnormalised
// output `acc`, and the result is acc / l.
//
// Cache layout: k / v [num_blocks, block_size, kv_heads, head_dim], contiguous, float32 or
// bfloat16 (a bfloat16 model's cache: half the bytes to read per decode step, widened to
// float32 as each row is loaded, so all arithmetic stays float32); token t of a sequence lives
// in block table[t / block_size], slot t % block_size. Only slots below a sequence's length are
// ever read (the rest of a block may hold anything, NaN included).
#pragma once

#include <algorithm>
#include <cstdint>

namespace kvmesh {

// T: float (float32) or uint16_t (bfloat16 bits, see cpu_math.h).
template <class T>
struct PagedCache {
  const T* k;
  const T* v;
  int64_t block_size;
  int64_t kv_heads;
  int64_t head_dim;
};

// Decode keys per tile: scores of one tile for a group of query heads sit in scratch.
constexpr int64_t kDecodeTile = 32;

// Decode: one query token of one sequence against its keys [begin, end), for kv heads
// [h0, h1) and the `groups` query heads sharing each: query row r = (h - h0) * groups + g at
// q + r * head_dim (pre-scaled). Updates m[r], l[r] and acc[r * head_dim ...] in place (start
// them at -inf, 0, 0). `scratch`: decode_scratch_floats(h1 - h0, groups, head_dim) floats.
template <class T>
void decode_range(const PagedCache<T>& c, const int32_t* table, int64_t h0, int64_t h1,
                  const float* q, int64_t groups, int64_t begin, int64_t end, float* m, float* l,
                  float* acc, float* scratch);

// Floats of scratch decode_range needs: score tiles, then room to widen a bfloat16 K and V
// tile or to hold the query rows' three bfloat16 parts (1.5 floats' room per query element).
inline int64_t decode_scratch_floats(int64_t kv_heads, int64_t groups, int64_t head_dim) {
  const int64_t rows = kv_heads * groups;
  return rows * kDecodeTile + std::max(2 * kDecodeTile * head_dim, (3 * rows * head_dim + 1) / 2);
}

// Combines `parts` partial states of the same rows (part p: m + p * rows, l + p * rows,
// acc + p * rows * head_dim; a part that saw no key has m = -inf) and writes the normalised
// rows: row r to out + r * head_dim.
void merge_partials(int64_t parts, int64_t rows, int64_t head_dim, const float* m,
                    const float* l, const float* acc, float* out);

// Extend: `tokens` consecutive query tokens of one sequence, the first at position
// `first_pos`, attend causally to that sequence's cached keys (and with window > 0 only to the
// last `window` positions up to their own). Query row (i, g) of kv head `kv_head` is
// q + i * q_stride + g * head_dim (not pre-scaled: `qscale` = scale * log2(e) is applied here);
// its output goes to out + i * out_stride + g * head_dim.
template <class T>
void extend_tile(const PagedCache<T>& c, const int32_t* table, int64_t kv_head, int64_t groups,
                 const float* q, int64_t q_stride, float* out, int64_t out_stride,
                 int64_t first_pos, int64_t tokens, float qscale, int64_t window,
                 float* scratch);

// How many query tokens one extend_tile call should take (rows = tokens x groups fill a tile).
int64_t extend_tile_tokens(int64_t groups);

// Floats of scratch extend_tile needs for up to `tokens` query tokens.
int64_t extend_scratch_floats(int64_t groups, int64_t head_dim, int64_t tokens);

}  // namespace kvmesh
