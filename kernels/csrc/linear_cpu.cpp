// See linear_cpu.h for what this is and why.
#include "linear_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>

namespace kvmesh {

namespace {

constexpr int64_t kCols = 16;  // output columns per packed block: one zmm of float32 lanes

int64_t depth_of(torch::ScalarType dtype) { return dtype == torch::kBFloat16 ? 2 : 1; }

}  // namespace

torch::Tensor pack_dot_linear_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 &&
                  (weight.dtype() == torch::kFloat32 || weight.dtype() == torch::kBFloat16),
              "pack_dot_linear_weight: the weight must be a float32 or bfloat16 [out, in] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t depth = depth_of(weight.scalar_type());
  TORCH_CHECK(K % depth == 0,
              "pack_dot_linear_weight: a bfloat16 weight's in_features must be even (pairs), got ",
              K);
  const int64_t blocks = (N + kCols - 1) / kCols;
  auto padded = torch::zeros({blocks * kCols, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  // [blocks, 16 columns, K/depth steps, depth] -> [blocks, K/depth steps, 16 columns, depth]
  return padded.view({blocks, kCols, K / depth, depth}).permute({0, 2, 1, 3}).contiguous();
}

#if defined(__AVX512F__)

namespace {

// One dtype's inner step: `kDepth` input features per weight line, and how a row's features
// meet a weight line (`madd`), how a bias is read and how a result is stored.
struct Float32Dot {
  using T = float;
  using W = __m512;
  static constexpr int64_t kDepth = 1;
  static W load(const T* w) { return _mm512_loadu_ps(w); }
  static __m512 madd(__m512 acc, const T* x, W w) {
    return _mm512_fmadd_ps(_mm512_set1_ps(*x), w, acc);
  }
  static __m512 load_bias(const T* b, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, b); }
  static void store(T* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
};

#if defined(__AVX512BF16__)
struct BFloat16Dot {
  using T = uint16_t;  // bfloat16 bits
  using W = __m512bh;
  static constexpr int64_t kDepth = 2;
  static W load(const T* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static __m512 madd(__m512 acc, const T* x, W w) {
    int32_t pair;  // the row's two features, side by side in x
    std::memcpy(&pair, x, sizeof(pair));
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pair), w);
  }
  static __m512 load_bias(const T* b, __mmask16 mask) {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, b);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(T* y, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
  }
};
#endif

// Rows of x per register tile, and 16-column blocks per tile: ROWS x BLOCKS float32
// accumulators (24 of the 32 zmm registers). In a prototype on Zen 4 against 16 x 1, 14 x 2,
// 12 x 2, 10 x 2, 8 x 2, 6 x 4 and 4 x 4 (bfloat16; float32 against 12 x 2, 6 x 4, 4 x 4),
// 8 x 3 was the fastest or close to it at every row count from 1 to 512.
constexpr int kTileRows = 8;
constexpr int kTileBlocks = 3;

template <typename Dot>
struct Problem {
  const typename Dot::T* x;  // [M, K] rows at stride ldx
  int64_t ldx;
  const typename Dot::T* w;  // packed [blocks, steps, 16, depth]
  int64_t steps;             // K / depth
  const typename Dot::T* bias;  // [N] or null
  typename Dot::T* y;           // [M, N] dense
  int64_t n;                    // N
};

// One register tile: `ROWS` rows of x from `row`, `BLOCKS` column blocks from `block`.
template <typename Dot, int ROWS, int BLOCKS>
void tile(const Problem<Dot>& p, int64_t row, int64_t block) {
  __m512 acc[ROWS][BLOCKS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  constexpr int64_t line = kCols * Dot::kDepth;  // elements per weight line
  const int64_t block_elems = p.steps * line;
  const auto* w = p.w + block * block_elems;
  const auto* x = p.x + row * p.ldx;
  for (int64_t k = 0; k < p.steps; ++k) {
    typename Dot::W wv[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) wv[b] = Dot::load(w + b * block_elems + k * line);
    for (int r = 0; r < ROWS; ++r) {
      const auto* xk = x + r * p.ldx + k * Dot::kDepth;
      for (int b = 0; b < BLOCKS; ++b) acc[r][b] = Dot::madd(acc[r][b], xk, wv[b]);
    }
  }
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t col = (block + b) * kCols;
    const int64_t width = std::min<int64_t>(kCols, p.n - col);
    const __mmask16 mask = width == kCols ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
    const __m512 bias = p.bias != nullptr ? Dot::load_bias(p.bias + col, mask) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r)
      Dot::store(p.y + (row + r) * p.n + col, mask, _mm512_add_ps(acc[r][b], bias));
  }
}

template <typename Dot>
using TileFn = void (*)(const Problem<Dot>&, int64_t, int64_t);

template <typename Dot, int BLOCKS, int... R>
constexpr std::array<TileFn<Dot>, sizeof...(R)> tiles_of_width(std::integer_sequence<int, R...>) {
  return {&tile<Dot, R + 1, BLOCKS>...};
}

// tiles[blocks - 1][rows - 1]: a tile for every shape up to kTileRows x kTileBlocks, so the
// last rows and the last columns run in one narrower tile, not row by row.
template <typename Dot>
constexpr std::array<std::array<TileFn<Dot>, kTileRows>, kTileBlocks> kTiles = {
    tiles_of_width<Dot, 1>(std::make_integer_sequence<int, kTileRows>{}),
    tiles_of_width<Dot, 2>(std::make_integer_sequence<int, kTileRows>{}),
    tiles_of_width<Dot, 3>(std::make_integer_sequence<int, kTileRows>{}),
};

template <typename Dot>
void run(const Problem<Dot>& p, int64_t M, int64_t blocks) {
  const int64_t groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  // Threads split the columns; each walks all rows over its columns, so a group's weights
  // (3 x 16 columns x K) are read from memory once and stay in L2 while the rows go past.
  // Below ~256K multiply-adds a second thread costs more than it saves.
  const bool one_thread = M * p.n * p.steps * Dot::kDepth < (1 << 18);
  const int64_t threads = one_thread ? 1 : std::min<int64_t>(at::get_num_threads(), groups);
  // The threads pull runs of groups from a shared counter rather than taking fixed halves:
  // on a machine shared with a server's other processes, a thread that loses its core for a
  // while leaves its columns to the others instead of making them wait at the end of the op.
  // Measured on a 2-core Zen 4 beside a process busy 200 us of every ms: SmolLM2 bfloat16
  // 2,048-token prefill steps 1,611-1,645 ms with fixed halves, 1,434-1,452 pulled (1,314-
  // 1,366 alone); 16-sequence decode steps 34.2-35.5 -> 32.0-34.2 ms. Alone: level. A run is
  // a few consecutive groups, one contiguous stretch of the packed weight, so the hardware
  // prefetchers still see long streams; about 8 runs per thread. Each group is computed the
  // same way whichever thread takes it, so results do not depend on the split.
  const int64_t run_len = std::max<int64_t>(1, groups / (threads * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t g0; (g0 = next.fetch_add(run_len, std::memory_order_relaxed)) < groups;) {
      const int64_t g1 = std::min(groups, g0 + run_len);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t block = g * kTileBlocks;
        const int nb = static_cast<int>(std::min<int64_t>(kTileBlocks, blocks - block));
        for (int64_t row = 0; row < M; row += kTileRows) {
          const int nr = static_cast<int>(std::min<int64_t>(kTileRows, M - row));
          kTiles<Dot>[nb - 1][nr - 1](p, row, block);
        }
      }
    }
  });
}

template <typename Dot>
Problem<Dot> problem(const torch::Tensor& x, const torch::Tensor& packed,
                     const std::optional<torch::Tensor>& bias, torch::Tensor& y) {
  using T = typename Dot::T;
  return {reinterpret_cast<const T*>(x.data_ptr()),
          x.stride(0),
          reinterpret_cast<const T*>(packed.data_ptr()),
          packed.size(1),
          bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
          reinterpret_cast<T*>(y.data_ptr()),
          y.size(1)};
}

}  // namespace

bool dot_linear_available(torch::ScalarType dtype) {
#if defined(__AVX512BF16__)
  if (dtype == torch::kBFloat16) return true;
#endif
  return dtype == torch::kFloat32;
}

torch::Tensor dot_linear(const torch::Tensor& x, const torch::Tensor& packed,
                         const std::optional<torch::Tensor>& bias, int64_t out_features) {
  const auto dtype = packed.scalar_type();
  const int64_t depth = depth_of(dtype);
  TORCH_CHECK(dot_linear_available(dtype) && packed.dim() == 4 && packed.size(2) == kCols &&
                  packed.size(3) == depth && packed.is_contiguous(),
              "dot_linear: the weight must come from pack_dot_linear_weight (and its dtype ",
              dtype, " be supported by this build)");
  TORCH_CHECK(out_features > 0 && (out_features + kCols - 1) / kCols == packed.size(0),
              "dot_linear: out_features ", out_features, " does not match the packed ",
              packed.size(0), " blocks of ", kCols, " columns");
  const int64_t in_features = packed.size(1) * depth;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype && x.size(1) == in_features &&
                  x.stride(1) == 1,
              "dot_linear: x must be ", dtype, " [rows, ", in_features,
              "] with dense rows, like the weight; got ", x.scalar_type(), " ", x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 &&
                    bias->size(0) == out_features && bias->is_contiguous(),
                "dot_linear: bias must be a dense ", dtype, " [", out_features, "]");
  }
  const int64_t M = x.size(0);
  auto y = torch::empty({M, out_features}, x.options());
  if (M == 0) return y;
#if defined(__AVX512BF16__)
  if (dtype == torch::kBFloat16) {
    run(problem<BFloat16Dot>(x, packed, bias, y), M, packed.size(0));
    return y;
  }
#endif
  run(problem<Float32Dot>(x, packed, bias, y), M, packed.size(0));
  return y;
}

#else  // no AVX-512 in this build

bool dot_linear_available(torch::ScalarType) { return false; }

torch::Tensor dot_linear(const torch::Tensor&, const torch::Tensor&,
                         const std::optional<torch::Tensor>&, int64_t) {
  TORCH_CHECK(false, "dot_linear: this build has no AVX-512 (see dot_linear_available)");
  return {};
}

#endif

}  // namespace kvmesh
