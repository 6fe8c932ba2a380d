// Drawing one token per row from a softmax, for CPUs: the sampler's inverse-CDF draw fused
// into two passes over each row. The bindings live in paged_decode_cpu.cpp.
#pragma once

#include <torch/extension.h>

namespace kvmesh {

// For each i, draws a token from row rows[i] of x [B, V] (float32, dense rows) with
// probabilities softmax(x[rows[i]] / temperature[i]): the first token whose running sum of
// exp((x - row_max[i]) / temperature[i]) exceeds uniforms[i] times the row's total (the CDF
// inverted at uniforms[i], as the sampler's torch draw does). -inf entries have probability 0
// and are never drawn. rows: int64 [N]; temperature, row_max: float32 [N] (row_max: each
// selected row's maximum, finite); uniforms: float64 [N] in [0, 1); top_p: float32 [N] in
// (0, 1], 1 for none: first drops the tokens top-p drops (taken by probability, largest first,
// a token goes once the mass before it reaches top_p; ties at the cut stay). Returns int64 [N].
// Each row is drawn by one thread with the same arithmetic whatever the batch, so a row's
// token depends only on its values and its uniform.
torch::Tensor sample_rows(const torch::Tensor& x, const torch::Tensor& rows,
                          const torch::Tensor& temperature, const torch::Tensor& row_max,
                          const torch::Tensor& uniforms, const torch::Tensor& top_p);

}  // namespace kvmesh
