// The decoder layer's elementwise ops for CPUs, fused: each reads its input once and writes its
// output once, where the torch twins (kernels/torch_ops.py) take three to six passes and as many
// temporaries. RMSNorm and SiLU-and-mul take float32 or bfloat16 (math in float32, rounded
// where the twins round); RoPE float32. The bindings live in paged_decode_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace kvmesh {

// A bfloat16 tensor's data as the kernels hold it: uint16_t bits (cpu_math.h widens them).
inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bf16_data_mut(torch::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// RMSNorm of x + residual, and that sum as the next residual: returns (out, sum), both new
// tensors (without a residual the sum is x itself). x, residual: [T, H] with dense rows;
// weight: [H].
std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x,
                                                   const std::optional<torch::Tensor>& residual,
                                                   const torch::Tensor& weight, double eps);

// silu(x[:, :I]) * x[:, I:] for the fused gate/up projection's output x [T, 2I] -> [T, I].
torch::Tensor silu_and_mul(const torch::Tensor& x);

// Rotates q [T, H, D] and k [T, KVH, D] in place (NeoX layout: the first and second halves of
// each head are the pair), at positions [T] (int64), with cos_sin [P, D] (cos, then sin).
// Tokens may be strided (views into the fused qkv output); each head must be dense.
void rotary_embedding(const torch::Tensor& positions, const torch::Tensor& q,
                      const torch::Tensor& k, const torch::Tensor& cos_sin);

// The attention layer's step between the qkv projection and attention, in one pass per token:
// reads q, k, v [T, heads, D] (float32 or bfloat16, tokens strided: views into the fused qkv
// output; heads dense), rotates q and k as rotary_embedding does (in float32), returns the
// rotated q as a new float32 [T, H, D] and writes the rotated k and v into the paged caches
// [NB, BS, KVH, D] (float32 or bfloat16, rounded to it) at slot_mapping [T] (int64; -1 skips
// the token, as padding). Same values as widening q, k, v to float32, rotary_embedding and a
// copy into the cache one after the other.
torch::Tensor rotary_and_cache(const torch::Tensor& positions, const torch::Tensor& q,
                               const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos_sin, torch::Tensor& k_cache,
                               torch::Tensor& v_cache, const torch::Tensor& slot_mapping);

// Index of each row's first maximum, as torch's argmax(dim=-1), for finite float32 x [B, V]
// with dense rows -> int64 [B]: one vectorised pass per row (torch's CPU argmax is a scalar
// loop), rows split across threads.
torch::Tensor argmax_rows(const torch::Tensor& x);

}  // namespace kvmesh
