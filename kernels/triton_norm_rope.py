"""Row-wise Triton kernels: fused residual-add + RMSNorm, rotary embedding, SiLU-and-mul.

Each rounds where its torch twin rounds (e.g. the normalised row is cast to the input dtype
before the weight multiplies it), so fp16/bf16 results match the twin to an ulp or so and fp32
results to float rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels import triton_common as tc
from kvmesh.kernels.triton_common import pow2


def _row_warps(block: int) -> int:
    """Enough warps that each thread holds ~8 elements of a row, at most 16."""
    return min(max(block // 256, 1), 16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = x + r  # in the input dtype, as the twin adds
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    out = w.to(out_ty) * normed.to(out_ty)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual) * weight, x + residual)``, one pass over the row."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = tc.empty(x2.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = tc.empty(x2.shape, x2.dtype, x.device)
    else:
        r2, res_out = x2, x2  # unused by the kernel
    rows = x2.shape[0]
    if rows:
        block = pow2(hidden)
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            res_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    out = out.view(*x.shape[:-1], hidden)
    if residual is None:
        return out, x
    return out, res_out.view(*x.shape[:-1], hidden)


@triton.jit
def _rotate_heads(
    base, stride_h, num_heads, cos, sin, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Rotate-half one token's heads in place: [x1, x2] → [x1 cos − x2 sin, x2 cos + x1 sin]."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    p1 = base + heads[:, None].to(tl.int64) * stride_h + dims[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + half, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(p1 + half, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cs_stride,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < half
    cos = tl.load(cs_ptr + pos * cs_stride + dims, mask=dmask, other=0.0)
    sin = tl.load(cs_ptr + pos * cs_stride + half + dims, mask=dmask, other=0.0)
    # The twin casts the float32 table to the activation dtype first; so do we.
    q_ty = q_ptr.dtype.element_ty
    cos = cos.to(q_ty).to(tl.float32)[None, :]
    sin = sin.to(q_ty).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr + tok * q_stride_t, q_stride_h, num_q_heads, cos, sin, half, BLOCK_HQ, BLOCK_D
    )
    _rotate_heads(
        k_ptr + tok * k_stride_t, k_stride_h, num_k_heads, cos, sin, half, BLOCK_HK, BLOCK_D
    )


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, KVH, D]`` in place; they may be strided views (the
    model splits them out of one fused QKV output), but each head's ``D`` must be contiguous."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding needs the head dimension contiguous")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    tokens = q.shape[0]
    if tokens == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    table = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rope_kernel[(tokens,)](
        positions,
        q,
        k,
        table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        table.stride(0),
        q.shape[1],
        k.shape[1],
        half,
        BLOCK_HQ=pow2(q.shape[1]),
        BLOCK_HK=pow2(k.shape[1]),
        BLOCK_D=pow2(half),
        num_warps=4,
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    # Rounded to the activation dtype before the product, as ``F.silu(g) * u`` rounds.
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for the fused gate/up projection output."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = tc.empty((x2.shape[0], inter), x.dtype, x.device)
    if x2.shape[0] and inter:
        block = min(pow2(inter), 1024)
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], inter)
