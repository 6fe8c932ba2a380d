// bfloat16 linear layers for CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake):
// y = x @ W^T (+ bias) with x, W and y in bfloat16, products summed in float32, through
// `vdpbf16ps`, which multiplies 16 pairs of bfloat16 values and adds each pair's two products
// into a float32 lane. The weight is packed once into the layout that instruction reads:
// 16 output columns by 2 input features per 64-byte line, so each step of the inner loop is
// one load of the weight and, for every input row, one 4-byte broadcast of that row's two
// features (read straight from x, whose rows already hold feature pairs side by side).
//
// Why not oneDNN's packed bfloat16 matmul, which the float32 path keeps: on a 2-core Zen 4
// with SmolLM2-135M's shapes (30 layers' distinct weights, then the LM head, as in a step),
// oneDNN took 16.0 / 23.6 / 52.3 / 339 ms at 1 / 16 / 64 / 512 rows and this kernel
// 9.2 / 16.6 / 46.0 / 334 ms: at one row it streams the weights at the memory's speed, and
// from 16 rows on the broadcast keeps 24 accumulators busy per weight load.
// The bindings live in paged_decode_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace kvmesh {

// Whether this build has the kernel (compiled with AVX512-BF16, i.e. -march=native on such
// a CPU). The functions below fail with a clear error where it does not.
bool bf16_dot_linear_available();

// The weight [N, K] (bfloat16, K even) packed for linear_bf16_dot: [ceil(N/16), K/2, 16, 2],
// columns past N zero.
torch::Tensor pack_bf16_dot_weight(const torch::Tensor& weight);

// x [M, K] (bfloat16, features dense, rows at any stride) times the packed weight of
// out_features (N) columns, plus bias [N] (bfloat16, optional, added in float32 before the
// rounding) -> a new bfloat16 [M, N]. Columns are split across the threads.
torch::Tensor linear_bf16_dot(const torch::Tensor& x, const torch::Tensor& packed,
                              const std::optional<torch::Tensor>& bias, int64_t out_features);

}  // namespace kvmesh
