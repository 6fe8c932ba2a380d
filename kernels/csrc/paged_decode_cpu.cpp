// Torch bindings of the CPU paged-attention kernels (attention_cpu.cpp): argument checks, how
// the work is cut into items, and the threads that run them.
//
// Pure torch has to gather every sequence's blocks into a padded tensor before it can
// multiply (several passes over the KV and a large allocation per layer); on a 2-core machine
// that gather cost more than the model's matmuls. These kernels walk the block tables in
// place and read each K and V element once.
//
// Work items: decode is cut per (sequence, group of kv heads), and the query heads sharing a
// kv head (GQA) read each K/V tile once together; when that gives too few items to keep
// every thread busy (batch-1 decode), long contexts are also split into key ranges whose
// partial softmax states are merged at the end (flash-decoding). Extend is cut
// per (sequence, kv head, tile of query tokens). Items run longest first from a shared
// counter on torch's intra-op threads (OpenMP in torch's CPU builds; at::parallel_for honours
// torch.set_num_threads, which the engine uses to size its share of the machine).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"
#include "elementwise_cpu.h"
#include "extend_amx.h"
#include "linear_cpu.h"
#include "sampling_cpu.h"

namespace {

constexpr int64_t kMinSplitKeys = 128;  // below this a split costs more than it balances
constexpr int64_t kItemsPerThread = 8;  // how finely to split when items are scarce
// A step smaller than this runs on one thread: waking the others and joining them costs a
// few microseconds, as much as the whole job (batch-1 decode of a short context), and on a
// busy machine a join can wait a scheduler tick for a descheduled thread.
constexpr int64_t kMinParallelBytes = 512 << 10;  // decode: K+V bytes to read
constexpr int64_t kMinParallelMacs = 4 << 20;     // extend: multiply-adds
constexpr float kLog2e = 1.4426950408889634f;
// The AMX extend kernel packs each chunk's keys first; past this many packed elements (K and V
// each, all chunks of a step) the float32 kernel, which reads the cache in place, runs instead.
constexpr int64_t kMaxAmxPackedElems = int64_t{64} << 20;

// Whether bfloat16 extend steps may use the AMX kernel (tests switch it to compare paths).
std::atomic<bool> g_extend_amx{true};

// The cache's element type: float for float32, uint16_t for bfloat16's bits.
template <class T>
const T* cache_data(const torch::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return kvmesh::bf16_data(t);
}

template <class T>
kvmesh::PagedCache<T> check_cache(const torch::Tensor& q, const torch::Tensor& k_cache,
                                  const torch::Tensor& v_cache, const torch::Tensor& out,
                                  const char* op) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32, op,
              ": float32 queries and output");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == torch::kFloat32 ||
                   k_cache.scalar_type() == torch::kBFloat16),
              op, ": K and V caches both float32 or both bfloat16");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes(),
              op, ": q/out [T, H, D], caches [NB, BS, KVH, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": contiguous caches");
  // Queries may be a view into the fused qkv projection: rows strided, each row dense.
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.stride(2) == 1 &&
                  out.stride(1) == out.size(2),
              op, ": each token's [H, D] must be dense");
  const int64_t H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, op, ": head shapes do not match");
  return {cache_data<T>(k_cache), cache_data<T>(v_cache), k_cache.size(1), KVH, D};
}

void check_index(const torch::Tensor& t, int64_t rows, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous() && t.size(0) == rows, what,
              ": int32, contiguous, one row per sequence");
}

// Runs work(item, scratch) for items [0, n) on torch's threads, each thread pulling the next
// item from a shared counter (a static split would hand one thread all the long sequences of
// a ragged batch). `scratch_floats`: per-thread scratch.
template <class F>
void run_items(int64_t n, int64_t max_threads, int64_t scratch_floats, F&& work) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min(max_threads, n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Uninitialised: every kernel writes its scratch before reading it, and zeroing the
    // AMX kernel's ~200 KB per thread per call cost as much as a short chunk's attention.
    const std::unique_ptr<float[]> scratch(new float[scratch_floats]);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;)
      work(i, scratch.get());
  });
}

struct DecodeItem {
  int64_t seq, h0, h1, part, parts, begin, end;
};

// out[tokens[i]] = attention of q[tokens[i]] (one query token of sequence i, the last of its
// seq_lens[i] tokens) over that sequence's cached keys; window > 0: only the last `window`.
template <class T>
void paged_decode_t(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                    torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                    torch::Tensor tokens, double scale, int64_t window) {
  const kvmesh::PagedCache<T> c = check_cache<T>(q, k_cache, v_cache, out, "paged_decode");
  const int64_t N = seq_lens.size(0), H = q.size(1), D = c.head_dim, KVH = c.kv_heads;
  const int64_t G = H / KVH;
  check_index(seq_lens, N, "paged_decode seq_lens");
  check_index(tokens, N, "paged_decode tokens");
  check_index(block_tables, N, "paged_decode block_tables");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* toks = tokens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_stride = q.stride(0), out_stride = out.stride(0);
  const float qscale = static_cast<float>(scale) * kLog2e;

  // A unit is (sequence, group of kv heads). All of a sequence's kv heads by default: a
  // token's K (and V) rows for every head are one contiguous run, so a tile of a block is
  // one sequential read instead of one short strided read per head. With fewer sequences
  // than threads the heads are dealt out too, and long contexts are split (below).
  int64_t total_keys = 0;
  for (int64_t n = 0; n < N; ++n)
    total_keys += window > 0 ? std::min<int64_t>(lens[n], window) : lens[n];
  const int64_t threads =
      total_keys * KVH * D * 2 * static_cast<int64_t>(sizeof(T)) < kMinParallelBytes
          ? 1
          : at::get_num_threads();
  const int64_t hpi = N >= threads ? KVH : std::max<int64_t>(1, KVH * N / threads);
  const int64_t groups_per_seq = (KVH + hpi - 1) / hpi;
  const int64_t units = N * groups_per_seq;
  // Split long contexts only when the units alone cannot keep every thread busy.
  const int64_t want = threads > 1 && units < kItemsPerThread * threads
                           ? (kItemsPerThread * threads + units - 1) / units
                           : 1;
  std::vector<DecodeItem> items;
  std::vector<int64_t> state_at(units, -1);  // where a split unit's partial rows start
  int64_t state_rows = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = lens[n];
    TORCH_CHECK(len >= 1 && (len - 1) / c.block_size < table_stride,
                "paged_decode: sequence length outside its block table");
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    const int64_t span = len - first;
    const int64_t parts = std::max<int64_t>(1, std::min(want, span / kMinSplitKeys));
    // Split points a whole number of blocks apart, so few tiles are cut in two.
    const int64_t chunk = (span + parts - 1) / parts;
    const int64_t step = (chunk + c.block_size - 1) / c.block_size * c.block_size;
    const int64_t used = (span + step - 1) / step;
    for (int64_t u = 0; u < groups_per_seq; ++u) {
      const int64_t h0 = u * hpi, h1 = std::min(KVH, h0 + hpi);
      if (used > 1) {
        state_at[n * groups_per_seq + u] = state_rows;
        state_rows += used * (h1 - h0) * G;
      }
      for (int64_t p = 0; p < used; ++p)
        items.push_back(
            {n, h0, h1, p, used, first + p * step, std::min(len, first + (p + 1) * step)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const DecodeItem& a, const DecodeItem& b) {
    return a.end - a.begin > b.end - b.begin;
  });
  // Partial states of split units, [part][row]: m and l per row, acc [row, D].
  std::vector<float> part_m(state_rows), part_l(state_rows), part_acc(state_rows * D);
  std::vector<std::atomic<int32_t>> pending(units);
  for (const DecodeItem& it : items)
    if (it.parts > 1 && it.part == 0)
      pending[it.seq * groups_per_seq + it.h0 / hpi].store(static_cast<int32_t>(it.parts));

  const int64_t max_rows = hpi * G;
  // scratch: scaled q rows, m, l, acc (for unsplit items), then decode_range's own
  const int64_t scratch = max_rows * (2 * D + 2) + kvmesh::decode_scratch_floats(hpi, G, D);
  run_items(static_cast<int64_t>(items.size()), threads, scratch, [&](int64_t i, float* s) {
    const DecodeItem& it = items[i];
    const int64_t unit = it.seq * groups_per_seq + it.h0 / hpi;
    const int64_t rows = (it.h1 - it.h0) * G;
    const float* qrow = qp + toks[it.seq] * q_stride + it.h0 * G * D;
    float* qs = s;
    for (int64_t j = 0; j < rows * D; ++j) qs[j] = qrow[j] * qscale;
    float *m, *l, *acc;
    if (it.parts > 1) {  // this part's rows in the unit's partials
      const int64_t at = state_at[unit] + it.part * rows;
      m = part_m.data() + at;
      l = part_l.data() + at;
      acc = part_acc.data() + at * D;
    } else {
      m = s + max_rows * D;
      l = m + max_rows;
      acc = l + max_rows;
    }
    std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + rows, 0.f);
    std::fill(acc, acc + rows * D, 0.f);
    kvmesh::decode_range(c, tables + it.seq * table_stride, it.h0, it.h1, qs, G, it.begin,
                         it.end, m, l, acc, s + max_rows * (2 * D + 2));
    float* orow = op + toks[it.seq] * out_stride + it.h0 * G * D;
    if (it.parts == 1) {
      kvmesh::merge_partials(1, rows, D, m, l, acc, orow);
    } else if (pending[unit].fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // The unit's last part to finish merges them all (acq_rel: it sees their writes).
      const int64_t at = state_at[unit];
      kvmesh::merge_partials(it.parts, rows, D, part_m.data() + at, part_l.data() + at,
                             part_acc.data() + at * D, orow);
    }
  });
}

struct ExtendItem {
  int64_t seq, kv_head, first_token, tokens, cost;
};

// Chunk i: query tokens q[q_starts[i] : q_starts[i] + q_lens[i]], the last q_lens[i] of its
// seq_lens[i] tokens (their K/V already in the cache), attend causally to every cached key up
// to their own position (window > 0: only the last `window`); results go to the same rows of
// out.
template <class T>
void paged_extend_t(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                    torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                    torch::Tensor q_starts, torch::Tensor q_lens, double scale, int64_t window) {
  const kvmesh::PagedCache<T> c = check_cache<T>(q, k_cache, v_cache, out, "paged_extend");
  const int64_t P = seq_lens.size(0), H = q.size(1), D = c.head_dim, KVH = c.kv_heads;
  const int64_t G = H / KVH;
  check_index(seq_lens, P, "paged_extend seq_lens");
  check_index(q_starts, P, "paged_extend q_starts");
  check_index(q_lens, P, "paged_extend q_lens");
  check_index(block_tables, P, "paged_extend block_tables");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = q_starts.data_ptr<int32_t>();
  const int32_t* qlens = q_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_stride = q.stride(0), out_stride = out.stride(0);
  const float qscale = static_cast<float>(scale) * kLog2e;
  const int64_t tile = kvmesh::extend_tile_tokens(G);

  std::vector<ExtendItem> items;
  int64_t total_cost = 0;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t len = lens[i], n = qlens[i];
    TORCH_CHECK(n >= 1 && len >= n && (len - 1) / c.block_size < table_stride &&
                    starts[i] >= 0 && starts[i] + n <= q.size(0),
                "paged_extend: chunk outside its queries or block table");
    for (int64_t t = 0; t < n; t += tile) {
      const int64_t count = std::min(tile, n - t);
      const int64_t last = len - n + t + count;  // keys this tile reads, at most
      const int64_t keys = window > 0 ? std::min(last, window + count) : last;
      for (int64_t h = 0; h < KVH; ++h) items.push_back({i, h, t, count, keys * count});
      total_cost += KVH * keys * count;
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const ExtendItem& a, const ExtendItem& b) { return a.cost > b.cost; });
  // total_cost counts (key, query token, kv head) triples: G x D multiply-adds each for the
  // scores and as many for V.
  const int64_t threads = total_cost * G * D * 2 < kMinParallelMacs ? 1 : at::get_num_threads();
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (g_extend_amx.load(std::memory_order_relaxed) && kvmesh::amx_extend_head_dim_ok(D) &&
        kvmesh::amx_extend_available()) {
      // Each chunk's keys (from the first one a window lets it see, in groups of 32) packed
      // once per kv head, then the same items on the tiles.
      // Sequence i's packed keys: kv head h's at packed_at[i] + h * head_elems[i].
      std::vector<int64_t> key_begin(P), head_elems(P), packed_at(P + 1, 0);
      for (int64_t i = 0; i < P; ++i) {
        const int64_t first = lens[i] - qlens[i];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, first - window + 1) : 0;
        key_begin[i] = lo / 32 * 32;
        head_elems[i] = kvmesh::amx_packed_elems(key_begin[i], lens[i], D);
        packed_at[i + 1] = packed_at[i] + KVH * head_elems[i];
      }
      if (packed_at[P] <= kMaxAmxPackedElems) {
        // Uninitialised on purpose: amx_pack_kv writes every element.
        std::unique_ptr<uint16_t[]> kpack(new uint16_t[packed_at[P]]);
        std::unique_ptr<uint16_t[]> vpack(new uint16_t[packed_at[P]]);
        auto head_offset = [&](int64_t seq, int64_t h) {
          return packed_at[seq] + h * head_elems[seq];
        };
        run_items(P * KVH, threads, 0, [&](int64_t i, float*) {
          const int64_t seq = i / KVH, h = i % KVH, at = head_offset(seq, h);
          kvmesh::amx_pack_kv(c, tables + seq * table_stride, h, key_begin[seq], lens[seq],
                              kpack.get() + at, vpack.get() + at);
        });
        const int64_t scratch_floats = (kvmesh::amx_extend_scratch_bytes(D) + 3) / 4;
        run_items(static_cast<int64_t>(items.size()), threads, scratch_floats,
                  [&](int64_t i, float* s) {
                    const ExtendItem& it = items[i];
                    const int64_t row = starts[it.seq] + it.first_token;
                    const int64_t pos = lens[it.seq] - qlens[it.seq] + it.first_token;
                    const int64_t at = head_offset(it.seq, it.kv_head);
                    kvmesh::amx_extend_tile(kpack.get() + at, vpack.get() + at,
                                            key_begin[it.seq], D, G,
                                            qp + row * q_stride + it.kv_head * G * D, q_stride,
                                            op + row * out_stride + it.kv_head * G * D,
                                            out_stride, pos, it.tokens, qscale, window, s);
                  });
        return;
      }
    }
  }
  const int64_t scratch = kvmesh::extend_scratch_floats(G, D, tile);
  run_items(static_cast<int64_t>(items.size()), threads, scratch, [&](int64_t i, float* s) {
    const ExtendItem& it = items[i];
    const int64_t row = starts[it.seq] + it.first_token;
    const int64_t pos = lens[it.seq] - qlens[it.seq] + it.first_token;
    kvmesh::extend_tile(c, tables + it.seq * table_stride, it.kv_head, G,
                        qp + row * q_stride + it.kv_head * G * D, q_stride,
                        op + row * out_stride + it.kv_head * G * D, out_stride, pos, it.tokens,
                        qscale, window, s);
  });
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                  torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                  torch::Tensor tokens, double scale, int64_t window) {
  if (k_cache.scalar_type() == torch::kBFloat16)
    return paged_decode_t<uint16_t>(out, q, k_cache, v_cache, block_tables, seq_lens, tokens,
                                    scale, window);
  paged_decode_t<float>(out, q, k_cache, v_cache, block_tables, seq_lens, tokens, scale, window);
}

void paged_extend(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                  torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                  torch::Tensor q_starts, torch::Tensor q_lens, double scale, int64_t window) {
  if (k_cache.scalar_type() == torch::kBFloat16)
    return paged_extend_t<uint16_t>(out, q, k_cache, v_cache, block_tables, seq_lens, q_starts,
                                    q_lens, scale, window);
  paged_extend_t<float>(out, q, k_cache, v_cache, block_tables, seq_lens, q_starts, q_lens,
                        scale, window);
}

}  // namespace

// Allows (or forbids) the AMX extend kernel for bfloat16 caches; returns the previous setting.
bool set_extend_amx(bool enabled) { return g_extend_amx.exchange(enabled); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_extend_available", &kvmesh::amx_extend_available,
        "whether bfloat16 extend attention can run on AMX tiles here");
  m.def("set_extend_amx", &set_extend_amx,
        "allow or forbid the AMX extend kernel; returns the previous setting");
  m.def("paged_decode", &paged_decode,
        "one-pass decode attention over a paged float32 or bfloat16 KV cache (GQA, split-K)");
  m.def("paged_extend", &paged_extend,
        "causal attention of prefill chunks over a paged float32 or bfloat16 KV cache (cached "
        "prefix + the chunk itself)");
  m.def("rms_norm", &kvmesh::rms_norm, "RMSNorm of x + residual, and the sum (float32)");
  m.def("silu_and_mul", &kvmesh::silu_and_mul, "silu(gate) * up of the fused projection");
  m.def("rotary_embedding", &kvmesh::rotary_embedding, "NeoX rotary embedding of q, k in place");
  m.def("rotary_and_cache", &kvmesh::rotary_and_cache,
        "RoPE of q and k, q returned as float32, k and v written into the paged caches");
  m.def("argmax_rows", &kvmesh::argmax_rows, "first maximum of each row of a float32 [B, V]");
  m.def("sample_rows", &kvmesh::sample_rows,
        "a token drawn from softmax(x[row] / temperature) at each row's uniform");
  m.def("dot_linear_available", &kvmesh::dot_linear_available,
        "whether this build has the AVX-512 linear kernel for a dtype");
  m.def("pack_dot_linear_weight", &kvmesh::pack_dot_linear_weight,
        "a float32 or bfloat16 [out, in] weight in the layout dot_linear reads");
  m.def("dot_linear", &kvmesh::dot_linear,
        "x @ W^T (+ bias) through broadcast FMAs (float32) or AVX512-BF16 pair dot products");
}
