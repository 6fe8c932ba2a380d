"""Write new K/V into the paged cache, quantising on the way in for int8 / fp8 caches.

One program per token writes every KV head of its key and value. Quantisation matches
``torch_ops.quantize_per_head`` bit for bit: per-(slot, head) scale ``amax / qmax`` with IEEE
division, int8 rounded half to even, fp8 e4m3 rounded to nearest even. Slots of -1 are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels.metadata import KVCacheLayer
from kvmesh.kernels.triton_common import (
    KV_QUANT_NONE,
    fp32_to_e4m3_bits,
    kernel_view,
    kv_quant_mode,
    pow2,
    round_half_even,
)


@triton.jit
def _quantize_store(x, dst_ptrs, scale_ptrs, mask, head_mask, QUANT: tl.constexpr):
    """Store ``x [heads, dims]`` (fp32) as int8 (QUANT=1) or e4m3 bits (QUANT=2) + scales."""
    qmax = 127.0 if QUANT == 1 else 448.0
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, qmax, tl.float32))
    scaled = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    if QUANT == 1:
        q = tl.minimum(tl.maximum(round_half_even(scaled), -127.0), 127.0).to(tl.int8)
    else:
        q = fp32_to_e4m3_bits(scaled)
    tl.store(dst_ptrs, q, mask=mask)
    tl.store(scale_ptrs, scale, mask=head_mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_ptr,
    key_stride_t,
    key_stride_h,
    value_stride_t,
    value_stride_h,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    scale_stride_b,
    scale_stride_s,
    scale_stride_h,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)  # keeps the (masked-off) addresses of skipped tokens in range
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_mask = (heads < num_heads) & valid
    mask = head_mask[:, None] & (dims[None, :] < head_dim)
    src_k = key_ptr + tok * key_stride_t + heads[:, None] * key_stride_h + dims[None, :]
    src_v = value_ptr + tok * value_stride_t + heads[:, None] * value_stride_h + dims[None, :]
    dst = block * cache_stride_b + offset * cache_stride_s
    dst = dst + heads[:, None].to(tl.int64) * cache_stride_h + dims[None, :]
    k = tl.load(src_k, mask=mask, other=0.0)
    v = tl.load(src_v, mask=mask, other=0.0)
    if QUANT == 0:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
    else:
        sdst = block * scale_stride_b + offset * scale_stride_s + heads * scale_stride_h
        _quantize_store(
            k.to(tl.float32), k_cache_ptr + dst, k_scale_ptr + sdst, mask, head_mask, QUANT
        )
        _quantize_store(
            v.to(tl.float32), v_cache_ptr + dst, v_scale_ptr + sdst, mask, head_mask, QUANT
        )


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, cache: KVCacheLayer, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value [T, KVH, D]`` (strided views allowed) at ``slot_mapping [T]``."""
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("reshape_and_cache needs the head dimension contiguous")
    tokens = key.shape[0]
    if tokens == 0:
        return
    _, block_size, num_heads, head_dim = cache.k.shape
    if cache.k.stride() != cache.v.stride() or cache.k.stride(-1) != 1:
        raise ValueError("K and V caches must share one layout with contiguous head dims")
    quant = kv_quant_mode(cache.k.dtype)
    if quant == KV_QUANT_NONE:
        k_scale = v_scale = cache.k  # unused
        scale_strides = (0, 0, 0)
    else:
        k_scale, v_scale = cache.k_scale, cache.v_scale
        scale_strides = k_scale.stride()
    _reshape_and_cache_kernel[(tokens,)](
        key,
        value,
        kernel_view(cache.k),
        kernel_view(cache.v),
        k_scale,
        v_scale,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache.k.stride()[:3],
        *scale_strides,
        num_heads,
        head_dim,
        BLOCK_SIZE=block_size,
        QUANT=quant,
        BLOCK_H=pow2(num_heads),
        BLOCK_D=pow2(head_dim),
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )
