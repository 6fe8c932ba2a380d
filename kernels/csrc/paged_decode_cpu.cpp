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

  at::parallel_for(0, N * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / KVH, h = item % KVH;
      const int64_t len = lens[n];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t span = len - first;
      scores.assign(G * span, 0.f);
      const float* qrow = qp + (n * H + h * G) * D;
      for (int64_t t = first; t < len; ++t) {
        // 64-bit offsets: block ids times strides overflow int32 on large caches.
        const int64_t blk = bt[n * MB + t / BS];
        const float* krow = kp + ((blk * BS + t % BS) * KVH + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qrow + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * krow[d];
          scores[g * span + (t - first)] = s * fscale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * span;
        float m = -INFINITY;
        for (int64_t t = 0; t < span; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < span; ++t) {
          sg[t] = std::exp(sg[t] - m);
          sum += sg[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < span; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {
        const int64_t blk = bt[n * MB + t / BS];
        const float* vrow = vp + ((blk * BS + t % BS) * KVH + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * span + (t - first)];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vrow[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(acc.begin() + g * D, acc.begin() + (g + 1) * D, op + (n * H + h * G + g) * D);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged float32 KV cache");
}
