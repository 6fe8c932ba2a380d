// The sampler's draw for CPUs (see sampling_cpu.h).
//
// Why: at 64 sequences, half sampled, the torch draw took ~1.6 ms of a ~4 ms engine step
// overhead on a Zen 4 CPU: it copies the sampled rows out, shifts and divides them, runs a
// softmax (three passes), pads, sums per chunk, searches, and scans one chunk, each a separate
// ATen op over 49k floats per row. Here each row is read twice: once to compute its
// exponentials (2^x by the polynomial of cpu_math.h, vectorised) into a per-thread scratch row
// while summing them per chunk, once more inside the one chunk the uniform falls in.
//
// The CDF is inverted on unnormalised weights (the total times the uniform), which is the same
// draw as normalising first. Chunk sums accumulate in double, so the search is exact to far
// below a float's rounding; each weight and each chunk's sum is float, as in the torch draw.
#include "sampling_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"

namespace kvmesh {
namespace {

constexpr int64_t kChunk = 256;  // tokens per chunk of the two-level search
constexpr float kLog2e = 1.4426950408889634f;

// The first token with the row's maximum (as argmax): the draw's fallback when rounding lands
// on a zero-weight entry at the very end of the CDF.
int64_t first_max(const float* row, int64_t V, float row_max) {
  for (int64_t i = 0; i < V; ++i)
    if (row[i] == row_max) return i;
  return 0;
}

// Sum of the weights w[0, n) that are >= t: per-chunk float partial sums, added in double.
double mass_at_least(const float* w, int64_t n, float t) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t end = std::min(begin + kChunk, n);
    vec16 acc = {};
    const vec16 zero = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      const vec16 v = load16(w + i);
      acc += v >= t ? v : zero;
    }
    float sum = hsum(acc);
    for (; i < end; ++i) sum += w[i] >= t ? w[i] : 0.f;
    total += sum;
  }
  return total;
}

// Top-p's cut: the weight of the last token kept when the tokens are taken by weight, largest
// first, until their mass reaches goal (so a token goes once the mass before it reaches goal).
// Weights are in [0, 1] (the row's maximum weighs exactly 1; below 2^-126 they are 0). The
// power-of-two band holding the cut is found by bisection on the exponent (7 passes), and only
// that band's weights are sorted. Ties at the cut are all kept.
float top_p_cut(const float* w, int64_t V, double goal, std::vector<float>& band) {
  int lo = 0, hi = 126;  // mass_at_least(2^-126) is every positive weight: >= goal
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (mass_at_least(w, V, std::ldexp(1.f, -mid)) >= goal)
      hi = mid;
    else
      lo = mid + 1;
  }
  const float band_lo = std::ldexp(1.f, -lo);
  const float band_hi = lo == 0 ? 2.f : std::ldexp(1.f, 1 - lo);
  double run = lo == 0 ? 0.0 : mass_at_least(w, V, band_hi);
  band.clear();
  for (int64_t i = 0; i < V; ++i)
    if (w[i] >= band_lo && w[i] < band_hi) band.push_back(w[i]);
  std::sort(band.begin(), band.end(), [](float a, float b) { return a > b; });
  for (const float v : band) {
    run += v;
    if (run >= goal) return v;
  }
  return band.empty() ? band_lo : band.back();  // rounding: keep the whole band
}

int64_t draw_row(const float* row, int64_t V, float scale, float row_max, double u, float top_p,
                 std::vector<float>& weights, std::vector<double>& chunk_cdf,
                 std::vector<float>& band) {
  const int64_t num_chunks = (V + kChunk - 1) / kChunk;
  weights.resize(num_chunks * kChunk);
  chunk_cdf.resize(num_chunks);
  float* w = weights.data();
  double total = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(begin + kChunk, V);
    vec16 acc = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      // (x - max) / T in log2 units: <= 0, and -inf (masked) gives exactly 0.
      const vec16 e = exp2_nonpos16((load16(row + i) - row_max) * scale);
      store16(w + i, e);
      acc += e;
    }
    float sum = hsum(acc);
    for (; i < end; ++i) {
      w[i] = exp2_nonpos((row[i] - row_max) * scale);
      sum += w[i];
    }
    total += sum;
    chunk_cdf[c] = total;
  }
  if (top_p < 1.f && total > 0.0) {
    // Zero the weights top-p drops, and sum the chunks again.
    const float cut = top_p_cut(w, V, static_cast<double>(top_p) * total, band);
    total = 0.0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t begin = c * kChunk, end = std::min(begin + kChunk, V);
      float sum = 0.f;
      for (int64_t i = begin; i < end; ++i) {
        w[i] = w[i] >= cut ? w[i] : 0.f;
        sum += w[i];
      }
      total += sum;
      chunk_cdf[c] = total;
    }
  }
  const double target = u * total;
  // The first chunk whose cumulative weight exceeds the target (the last one if rounding
  // leaves none), then the first token inside it whose running weight does.
  int64_t c = 0;
  while (c < num_chunks - 1 && chunk_cdf[c] <= target) ++c;
  double run = c > 0 ? chunk_cdf[c - 1] : 0.0;
  const int64_t begin = c * kChunk, end = std::min(begin + kChunk, V);
  int64_t token = end - 1;
  for (int64_t i = begin; i < end; ++i) {
    run += w[i];
    if (run > target) {
      token = i;
      break;
    }
  }
  return w[token] > 0.f ? token : first_max(row, V, row_max);
}

}  // namespace

torch::Tensor sample_rows(const torch::Tensor& x, const torch::Tensor& rows,
                          const torch::Tensor& temperature, const torch::Tensor& row_max,
                          const torch::Tensor& uniforms, const torch::Tensor& top_p) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat32 &&
                  x.stride(1) == 1 && x.size(1) >= 1,
              "sample_rows: x must be a float32 CPU [B, V] with dense rows");
  const int64_t N = rows.numel();
  const auto check_per_row = [N](const torch::Tensor& t, torch::ScalarType dtype,
                                 const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                    t.numel() == N,
                "sample_rows: ", what, " must be a contiguous ", c10::toString(dtype),
                " CPU tensor with one value per row [", N, "]");
  };
  check_per_row(rows, torch::kInt64, "rows");
  check_per_row(temperature, torch::kFloat32, "temperature");
  check_per_row(row_max, torch::kFloat32, "row_max");
  check_per_row(uniforms, torch::kFloat64, "uniforms");
  check_per_row(top_p, torch::kFloat32, "top_p");
  const int64_t B = x.size(0), V = x.size(1), xs = x.stride(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(0 <= rp[i] && rp[i] < B, "sample_rows: row ", rp[i], " outside [0, ", B, ")");
  const float* xp = x.data_ptr<float>();
  const float* tp = temperature.data_ptr<float>();
  const float* mp = row_max.data_ptr<float>();
  const double* up = uniforms.data_ptr<double>();
  const float* pp = top_p.data_ptr<float>();
  torch::Tensor out = torch::empty({N}, rows.options());
  int64_t* op = out.data_ptr<int64_t>();
  // One row is ~V exponentials: a thread per few rows is worth waking.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / V);
  at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights;
    std::vector<double> chunk_cdf;
    std::vector<float> band;
    for (int64_t i = i0; i < i1; ++i)
      op[i] = draw_row(xp + rp[i] * xs, V, kLog2e / tp[i], mp[i], up[i], pp[i], weights,
                       chunk_cdf, band);
  });
  return out;
}

}  // namespace kvmesh
