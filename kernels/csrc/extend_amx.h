// Extend attention on Intel AMX tiles, for a bfloat16 cache (see extend_amx.cpp for why).
//
// The same contract as extend_tile in attention_cpu.h (queries float32, output float32, causal
// with an optional sliding window), but K and V are read from a packed copy of the sequence's
// keys made once per (sequence, kv head) by amx_pack_kv rather than from the paged cache:
// the tile instructions want their right-hand operand in pairs of rows ("VNNI" layout), which
// the cache's [token][head][dim] rows are not.
#pragma once

#include <cstdint>

#include "attention_cpu.h"

namespace kvmesh {

// Whether this build has the AMX kernel (compiled with AMX-BF16) and the OS lets this process
// use the tile registers (Linux asks each process to request them once). Thread-safe; asks
// the OS on the first call only.
bool amx_extend_available();

// Head dims the AMX kernel takes (whole groups of 64).
inline bool amx_extend_head_dim_ok(int64_t head_dim) {
  return head_dim > 0 && head_dim % 64 == 0 && head_dim <= 256;
}

// Keys are packed in groups of 32 from `key_begin` (a multiple of 32); elements (uint16_t) of
// packed K, and as many of packed V, for keys [key_begin, key_end).
int64_t amx_packed_elems(int64_t key_begin, int64_t key_end, int64_t head_dim);

// Packs keys [key_begin, key_end) of one kv head of one sequence (block table `table`) into
// kpack and vpack (amx_packed_elems each). Slots past key_end up to the next group of 32 are
// zeros: a free slot of the cache may hold anything, NaN included, and 0 x NaN is NaN.
void amx_pack_kv(const PagedCache<uint16_t>& c, const int32_t* table, int64_t kv_head,
                 int64_t key_begin, int64_t key_end, uint16_t* kpack, uint16_t* vpack);

// Bytes of scratch amx_extend_tile needs (one call at a time per buffer).
int64_t amx_extend_scratch_bytes(int64_t head_dim);

// extend_tile's job (rows = tokens x groups <= 64: extend_tile_tokens) from packed K and V
// of keys [key_begin, ...) that cover every key these rows may see.
void amx_extend_tile(const uint16_t* kpack, const uint16_t* vpack, int64_t key_begin,
                     int64_t head_dim, int64_t groups, const float* q, int64_t q_stride,
                     float* out, int64_t out_stride, int64_t first_pos, int64_t tokens,
                     float qscale, int64_t window, void* scratch);

}  // namespace kvmesh
