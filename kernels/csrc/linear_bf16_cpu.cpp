// See linear_bf16_cpu.h for what this is and why.
#include "linear_bf16_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "elementwise_cpu.h"

namespace kvmesh {

namespace {

constexpr int64_t kCols = 16;  // output columns per packed block: one zmm of float32 lanes

void check_packed(const torch::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(packed.dtype() == torch::kBFloat16 && packed.dim() == 4 && packed.size(2) == kCols &&
                  packed.size(3) == 2 && packed.is_contiguous(),
              "linear_bf16_dot: the weight must come from pack_bf16_dot_weight");
  TORCH_CHECK(out_features > 0 && (out_features + kCols - 1) / kCols == packed.size(0),
              "linear_bf16_dot: out_features ", out_features, " does not match the packed ",
              packed.size(0), " blocks of ", kCols, " columns");
}

}  // namespace

torch::Tensor pack_bf16_dot_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.dtype() == torch::kBFloat16,
              "pack_bf16_dot_weight: the weight must be a bfloat16 [out, in] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 2 == 0, "pack_bf16_dot_weight: in_features must be even (pairs), got ", K);
  const int64_t blocks = (N + kCols - 1) / kCols;
  auto padded = torch::zeros({blocks * kCols, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  // [blocks, 16 columns, K/2 pairs, 2] -> [blocks, K/2 pairs, 16 columns, 2]
  return padded.view({blocks, kCols, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

#if defined(__AVX512BF16__)

bool bf16_dot_linear_available() { return true; }

namespace {

// Rows of x per register tile, and 16-column blocks per tile: ROWS x BLOCKS float32
// accumulators (24 of the 32 zmm registers), one weight load per block and one broadcast per
// row at each feature pair. Measured against 16 x 1, 14 x 2, 8 x 2, 6 x 4 and 4 x 4 on
// Zen 4: 8 x 3 was the fastest or within 3 % at every row count from 1 to 512.
constexpr int kTileRows = 8;
constexpr int kTileBlocks = 3;

struct Problem {
  const uint16_t* x;      // [M, K] rows at stride ldx
  int64_t ldx;
  const uint16_t* w;      // packed [blocks, K2, 16, 2]
  int64_t pairs;          // K / 2
  const uint16_t* bias;   // [N] or null
  uint16_t* y;            // [M, N] dense
  int64_t n;              // N
};

// One register tile: `ROWS` rows of x from `row`, `BLOCKS` column blocks from `block`.
template <int ROWS, int BLOCKS>
void tile(const Problem& p, int64_t row, int64_t block) {
  __m512 acc[ROWS][BLOCKS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t block_elems = p.pairs * kCols * 2;
  const uint16_t* w = p.w + block * block_elems;
  const uint16_t* x = p.x + row * p.ldx;
  for (int64_t k = 0; k < p.pairs; ++k) {
    __m512bh wv[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b)
      wv[b] = (__m512bh)_mm512_loadu_si512(w + b * block_elems + k * kCols * 2);
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * p.ldx + 2 * k, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < BLOCKS; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xb, wv[b]);
    }
  }
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t col = (block + b) * kCols;
    const int64_t width = std::min<int64_t>(kCols, p.n - col);
    const __mmask16 mask = width == kCols ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
    __m512 bias = _mm512_setzero_ps();
    if (p.bias != nullptr) {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, p.bias + col);
      bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], bias));
      _mm256_mask_storeu_epi16(p.y + (row + r) * p.n + col, mask, out);
    }
  }
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

template <int BLOCKS, int... R>
constexpr auto tiles_for_blocks(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&tile<R + 1, BLOCKS>...};
}

// kTiles[blocks - 1][rows - 1]: a tile for every shape up to kTileRows x kTileBlocks, so the
// last rows and the last columns run in one narrower tile, not row by row.
const std::array<std::array<TileFn, kTileRows>, kTileBlocks> kTiles = {
    tiles_for_blocks<1>(std::make_integer_sequence<int, kTileRows>{}),
    tiles_for_blocks<2>(std::make_integer_sequence<int, kTileRows>{}),
    tiles_for_blocks<3>(std::make_integer_sequence<int, kTileRows>{}),
};

}  // namespace

torch::Tensor linear_bf16_dot(const torch::Tensor& x, const torch::Tensor& packed,
                              const std::optional<torch::Tensor>& bias, int64_t out_features) {
  check_packed(packed, out_features);
  const int64_t pairs = packed.size(1);
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kBFloat16 && x.size(1) == 2 * pairs &&
                  x.stride(1) == 1,
              "linear_bf16_dot: x must be bfloat16 [rows, ", 2 * pairs,
              "] with dense rows, got ", x.sizes(), " ", x.dtype());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == torch::kBFloat16 && bias->dim() == 1 &&
                    bias->size(0) == out_features && bias->is_contiguous(),
                "linear_bf16_dot: bias must be a dense bfloat16 [", out_features, "]");
  }
  const int64_t M = x.size(0);
  auto y = torch::empty({M, out_features}, x.options());
  if (M == 0) return y;
  const Problem p{bf16_data(x), x.stride(0), bf16_data(packed),
                  pairs,        bias.has_value() ? bf16_data(*bias) : nullptr,
                  bf16_data_mut(y), out_features};
  const int64_t blocks = packed.size(0);
  const int64_t groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  // Threads split the columns; each walks all rows over its columns, so a group's weights
  // (3 x K x 32 bytes) are read from memory once and stay in L2 while the rows go past.
  // Below ~256K multiply-adds a second thread costs more than it saves.
  const int64_t grain = M * out_features * 2 * pairs < (1 << 18) ? groups : 1;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t block = g * kTileBlocks;
      const int nb = static_cast<int>(std::min<int64_t>(kTileBlocks, blocks - block));
      for (int64_t row = 0; row < M; row += kTileRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kTileRows, M - row));
        kTiles[nb - 1][nr - 1](p, row, block);
      }
    }
  });
  return y;
}

#else  // no AVX512-BF16 in this build

bool bf16_dot_linear_available() { return false; }

torch::Tensor linear_bf16_dot(const torch::Tensor&, const torch::Tensor&,
                              const std::optional<torch::Tensor>&, int64_t) {
  TORCH_CHECK(false,
              "linear_bf16_dot: this build has no AVX512-BF16 (the CPU lacks avx512_bf16); "
              "use oneDNN's packed linear");
  return {};
}

#endif

}  // namespace kvmesh
