// Linear layers for CPUs with AVX-512: y = x @ W^T (+ bias), float32 or bfloat16 (x, W and y
// of one dtype; products summed in float32). The weight is packed once into 16-column blocks,
// each 64-byte line holding one input feature (float32) or one feature pair (bfloat16) for 16
// output columns, so each step of the inner loop is one load of the weight per block and, for
// every input row, one broadcast of that row's feature (pair) read straight from x, into a
// float32 FMA (float32) or `vdpbf16ps` (bfloat16, AVX512-BF16: 16 pairs multiplied and each
// pair's two products added into a float32 lane). A register tile is 8 rows x 3 blocks: 24
// accumulators per 3 weight loads.
//
// Why not oneDNN's packed matmul, which kvmesh used before: on a 2-core Zen 4 with
// SmolLM2-135M's shapes (30 layers' distinct weights, then the LM head, as in a step;
// bench/cpu_linear_bench.py), oneDNN took 14.1 / 18.0 / 47.8 / 321 ms in bfloat16 at 1 / 16 /
// 64 / 512 rows and this kernel 8.7 / 13.6 / 42.5 / 318 ms; float32 23.1 / 31.0 / 90.3 / 676
// against 15.3 / 24.1 / 81.7 / 673 ms: at one row it streams the weights at the memory's
// speed, from 16 rows on the broadcast keeps 24 accumulators busy per weight load, and at
// prefill sizes both are at the CPU's peak. The bindings live in paged_decode_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace kvmesh {

// Whether this build has the kernel for `dtype` (float32: AVX-512F; bfloat16: AVX512-BF16,
// i.e. -march=native on such a CPU). The functions below fail with a clear error where not.
bool dot_linear_available(torch::ScalarType dtype);

// The weight [N, K] (float32, or bfloat16 with K even) packed for dot_linear:
// [ceil(N/16), K/depth, 16, depth] with depth 1 (float32) or 2 (bfloat16), columns past N zero.
torch::Tensor pack_dot_linear_weight(const torch::Tensor& weight);

// x [M, K] (the weight's dtype, features dense, rows at any stride) times the packed weight of
// out_features (N) columns, plus bias [N] (same dtype, optional, added in float32 before any
// rounding) -> a new [M, N] of x's dtype. Columns are split across the threads.
torch::Tensor dot_linear(const torch::Tensor& x, const torch::Tensor& packed,
                         const std::optional<torch::Tensor>& bias, int64_t out_features);

}  // namespace kvmesh
