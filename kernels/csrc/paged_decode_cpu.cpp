// Decode attention read straight from the paged KV cache, for CPUs.
//
// Pure torch has to gather every sequence's blocks into a padded tensor before it can
// multiply (three passes over the KV and a large allocation per layer); on a 2-core machine
// that gather cost more than the model's matmuls. This kernel walks each sequence's block
// table in place: one pass over K, one over V, no allocation beyond a score row.
//
// q [N, H, D] float32, one query token per sequence; k_cache / v_cache [NB, BS, KVH, D]
// float32 contiguous; block_tables [N, MB] int32; seq_lens [N] int32; out [N, H, D].
// window > 0 limits attention to the last `window` positions (sliding window).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

// Dot product; `omp simd reduction` lets the compiler keep vector accumulators and reduce
// them once at the end, without -ffast-math (a plain `s += a[i] * b[i]` loop is a serial
// dependency chain otherwise).
static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                  torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                  double scale, int64_t window) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32,
              "paged_decode: float32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous() &&
                  out.is_contiguous(),
              "paged_decode: contiguous tensors only");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, MB = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t slot = KVH * D;  // one token's K (or V) for all kv heads: contiguous

  // One sequence per work item: each token's K row for all heads is one contiguous read.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(H * D);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t len = lens[n];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t span = len - first;
      scores.resize(H * span);
      const float* qn = qp + n * H * D;
      const int32_t* table = bt + n * MB;
      for (int64_t t = first; t < len; ++t) {
        // 64-bit offsets: block ids times strides overflow int32 on large caches.
        const float* krow = kp + (static_cast<int64_t>(table[t / BS]) * BS + t % BS) * slot;
        for (int64_t h = 0; h < H; ++h)
          scores[h * span + (t - first)] = dot(qn + h * D, krow + (h / G) * D, D) * fscale;
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sh = scores.data() + h * span;
        float m = -INFINITY;
        for (int64_t t = 0; t < span; ++t) m = std::max(m, sh[t]);
#pragma omp simd
        for (int64_t t = 0; t < span; ++t) sh[t] = std::exp(sh[t] - m);
        float sum = 0.f;
        for (int64_t t = 0; t < span; ++t) sum += sh[t];
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < span; ++t) sh[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const float* vrow = vp + (static_cast<int64_t>(table[t / BS]) * BS + t % BS) * slot;
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * span + (t - first)];
          const float* vh = vrow + (h / G) * D;
          float* a = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + n * H * D);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged float32 KV cache");
}
