"""Paged prefill / extend attention (FlashAttention-style tiling with an online softmax).

The batch is packed: sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``,
which are the *last* ``q_len`` positions of its ``seq_len``-token context, so they attend to the
cached prefix plus themselves, causally. One program takes ``BLOCK_M`` query rows of one head of
one sequence and walks the context in ``BLOCK_N``-token tiles gathered through the block table.

Tiles wholly below the diagonal need no mask, so the walk has two phases: unmasked tiles, then
the (at most ``BLOCK_M / BLOCK_N + 1``) masked ones near the diagonal. With a sliding window every
tile is masked: that path is rarer and keeps the code simple.

The grid is planned from ``max_query_len`` (a host int), so launching needs no device sync;
programs past their sequence's last query tile exit at once. Tiles are handed out last-first
because later tiles see more keys: the longest programs start earliest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels import triton_common as tc
from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer
from kvmesh.kernels.triton_common import (
    INTERPRET,
    KV_QUANT_NONE,
    LOG2E,
    NEG_BIG,
    dot_in_fp32,
    kernel_view,
    kv_quant_mode,
    load_kv,
    pow2,
)


def tile_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch shape. Tiny tiles under the interpreter (many tiles per test)."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact fp32 dots run on CUDA cores: small tiles, no spills
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    n0,
    q_pos,
    kv_end,
    window,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    bt_row,
    head_off,
    scale_head_off,
    cache_stride_b,
    cache_stride_s,
    scale_stride_b,
    scale_stride_s,
    qk_scale,
    dims,
    dmask,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_TY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One online-softmax step over keys ``n0 .. n0 + BLOCK_N``; returns (acc, m_i, l_i)."""
    toks = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        tmask = toks < kv_end
        page = tl.load(bt_row + toks // PAGE_SIZE, mask=tmask, other=0)
        kv_mask = tmask[:, None] & dmask[None, :]
    else:
        # Every key of the tile exists: no token predicate (only head-dim padding, if any).
        tmask = None
        page = tl.load(bt_row + toks // PAGE_SIZE)
        kv_mask = None if BLOCK_D == HEAD_DIM else dmask[None, :]
    page = page.to(tl.int64)
    in_page = (toks % PAGE_SIZE).to(tl.int64)
    row_off = page * cache_stride_b + in_page * cache_stride_s + head_off
    kv_off = row_off[:, None] + dims[None, :]
    scale_off = page * scale_stride_b + in_page * scale_stride_s + scale_head_off
    k = load_kv(k_ptr + kv_off, kv_mask, ks_ptr + scale_off, tmask, QUANT)
    s = tl.dot(q, tl.trans(k.to(DOT_TY)), input_precision="ieee") * qk_scale
    if MASKED:
        allowed = (toks[None, :] <= q_pos[:, None]) & tmask[None, :]
        if HAS_WINDOW:
            allowed = allowed & (toks[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = load_kv(v_ptr + kv_off, kv_mask, vs_ptr + scale_off, tmask, QUANT)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_TY), v.to(DOT_TY), input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_ptr,
    seq_lens_ptr,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    cache_stride_b,
    cache_stride_s,
    cache_stride_h,
    scale_stride_b,
    scale_stride_s,
    scale_stride_h,
    bt_stride,
    window,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(2)
    head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    tile = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0)
    if tile < 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # cached prefix before this chunk
    m0 = tile * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = ctx + rows
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    tok_rows = (q_start + rows).to(tl.int64)
    q_ptrs = q_ptr + tok_rows[:, None] * q_stride_t + head * q_stride_h + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dmask[None, :], other=0.0)
    DOT_TY: tl.constexpr = tl.float32 if DOT_F32 else q_ptr.dtype.element_ty
    q = q.to(DOT_TY)

    kv_head = head // GROUP
    head_off = kv_head.to(tl.int64) * cache_stride_h
    scale_head_off = kv_head.to(tl.int64) * scale_stride_h
    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_stride
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)  # one past the tile's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx + m0 - window + 1, 0)
    else:
        # Keys <= the tile's first query are visible to every row: no mask needed.
        full_end = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, n0, q_pos, kv_end, window,
                k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, head_off, scale_head_off,
                cache_stride_b, cache_stride_s, scale_stride_b, scale_stride_s,
                qk_scale, dims, dmask,
                False, HAS_WINDOW, PAGE_SIZE, QUANT, DOT_TY, HEAD_DIM, BLOCK_D, BLOCK_N,
            )  # fmt: skip
        lo = full_end
    for n0 in range(lo, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, n0, q_pos, kv_end, window,
            k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, head_off, scale_head_off,
            cache_stride_b, cache_stride_s, scale_stride_b, scale_stride_s,
            qk_scale, dims, dmask,
            True, HAS_WINDOW, PAGE_SIZE, QUANT, DOT_TY, HEAD_DIM, BLOCK_D, BLOCK_N,
        )  # fmt: skip

    # Padding rows past q_len may have seen no key at all (sliding window): avoid 0/0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + tok_rows[:, None] * out_stride_t + head * out_stride_h + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])


def prefill_attention(
    q: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks (any lengths, 1 included) over the paged cache.
    ``config`` overrides :func:`tile_config` (benchmark sweeps)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = cache.k.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    out = tc.empty(q.shape, q.dtype, q.device)
    if num_tokens == 0:
        return out
    cfg = dict(config or tile_config(head_dim, q.dtype))
    block_m = cfg.pop("BLOCK_M")
    quant = kv_quant_mode(cache.k.dtype)
    k_scale = cache.k if quant == KV_QUANT_NONE else cache.k_scale
    v_scale = cache.v if quant == KV_QUANT_NONE else cache.v_scale
    scale_strides = (0, 0, 0) if quant == KV_QUANT_NONE else k_scale.stride()
    grid = (triton.cdiv(meta.max_query_len, block_m), num_heads, meta.num_seqs)
    _prefill_kernel[grid](
        q,
        kernel_view(cache.k),
        kernel_view(cache.v),
        k_scale,
        v_scale,
        out,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *cache.k.stride()[:3],
        *scale_strides,
        meta.block_tables.stride(0),
        sliding_window or 0,
        scale * LOG2E,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        QUANT=quant,
        HAS_WINDOW=sliding_window is not None,
        DOT_F32=dot_in_fp32(q.dtype),
        BLOCK_M=block_m,
        BLOCK_D=pow2(head_dim, 16),
        **cfg,
    )
    return out
