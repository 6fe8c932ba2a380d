"""Paged decode attention: one query token per sequence, split-KV ("flash decoding").

A decode step is bound by reading K/V, and one program per (sequence, KV head) leaves most of the
GPU idle when sequences are few and long. So each sequence's context is cut into ``num_splits``
contiguous ranges; a program per (sequence, KV head, split) computes an unnormalised partial
softmax-weighted sum with its running max and denominator, and a second kernel merges the
partials (rescaling each by ``exp(m_split - m_max)``). With one split the first kernel
normalises and writes the output itself.

Every query head of a KV head's group is handled by the same program, so K/V are read once per
group (GQA/MQA): the group is padded to 16 rows, the smallest ``tl.dot`` takes.
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
    num_sms,
    pow2,
)

# Tokens per inner-loop tile. Small under the interpreter so tests cover many tiles cheaply.
BLOCK_N = 16 if INTERPRET else 64
# A split shorter than this costs more in merging than it gains in parallelism.
MIN_SPLIT_TOKENS = BLOCK_N if INTERPRET else 256
MAX_SPLITS = 64


def plan_splits(num_seqs: int, num_kv_heads: int, max_len: int, sm_count: int) -> int:
    """How many KV splits per sequence: about 8 programs per SM (several resident at once, and
    enough waves that the last one's tail is short), no split shorter than ``MIN_SPLIT_TOKENS``
    (``max_len``, the longest attended span, is known on the host: no device sync)."""
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(8 * sm_count, max(programs, 1))
    longest = triton.cdiv(max(max_len, 1), MIN_SPLIT_TOKENS)
    return max(1, min(wanted, longest, MAX_SPLITS))


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
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
    num_splits,
    split_len,
    window,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    lo = start + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dmask = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    seq64 = seq.to(tl.int64)
    q_ptrs = q_ptr + seq64 * q_stride_t + heads[:, None] * q_stride_h + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dmask[None, :], other=0.0)
    dot_ty = tl.float32 if DOT_F32 else q.dtype
    q = q.to(dot_ty)

    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq64 * bt_stride
    head_off = kv_head.to(tl.int64) * cache_stride_h
    scale_head_off = kv_head.to(tl.int64) * scale_stride_h
    for n0 in range(lo, hi, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < hi
        page = tl.load(bt_row + toks // PAGE_SIZE, mask=tmask, other=0).to(tl.int64)
        in_page = (toks % PAGE_SIZE).to(tl.int64)
        row_off = page * cache_stride_b + in_page * cache_stride_s + head_off
        kv_off = row_off[:, None] + dims[None, :]
        scale_off = page * scale_stride_b + in_page * scale_stride_s + scale_head_off
        kv_mask = tmask[:, None] & dmask[None, :]
        k = load_kv(k_ptr + kv_off, kv_mask, ks_ptr + scale_off, tmask, QUANT)
        s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee") * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv(v_ptr + kv_off, kv_mask, vs_ptr + scale_off, tmask, QUANT)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_ty), v.to(dot_ty), input_precision="ieee")
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + seq64 * out_stride_t + heads[:, None] * out_stride_h + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])
    else:
        # Partials laid out [seq, head, split, ...] so the merge reads each head's contiguously.
        part = (seq64 * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(
            part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_mask[:, None]
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    out_stride_t,
    out_stride_h,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    smask = splits < num_splits
    part = (seq * num_heads + head) * num_splits + splits
    m = tl.load(part_ml_ptr + part * 2, mask=smask, other=NEG_BIG)
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=smask[:, None], other=0.0
    )
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)  # empty splits kept m = NEG_BIG, l = 0: weight ~0, contribution 0
    denom = tl.sum(l_s * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    o_ptrs = out_ptr + seq * out_stride_t + head * out_stride_h + dims
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def decode_attention(
    q: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention for a batch where every sequence has exactly one new token (row ``i`` of ``q``
    belongs to sequence ``i``). ``num_splits`` overrides the planner (tests, benchmarks)."""
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = cache.k.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    out = tc.empty(q.shape, q.dtype, q.device)
    if num_tokens == 0:
        return out
    span = meta.max_seq_len if sliding_window is None else min(meta.max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = plan_splits(num_tokens, num_kv_heads, span, num_sms(q.device))
    split_len = triton.cdiv(triton.cdiv(max(span, 1), num_splits), BLOCK_N) * BLOCK_N
    block_d = pow2(head_dim, 16)
    if num_splits > 1:
        part_acc = tc.empty((num_tokens, num_heads, num_splits, block_d), torch.float32, q.device)
        part_ml = tc.empty((num_tokens, num_heads, num_splits, 2), torch.float32, q.device)
    else:
        part_acc = part_ml = out  # unused
    quant = kv_quant_mode(cache.k.dtype)
    k_scale = cache.k if quant == KV_QUANT_NONE else cache.k_scale
    v_scale = cache.v if quant == KV_QUANT_NONE else cache.v_scale
    scale_strides = (0, 0, 0) if quant == KV_QUANT_NONE else k_scale.stride()
    _decode_partial_kernel[(num_tokens, num_kv_heads, num_splits)](
        q,
        kernel_view(cache.k),
        kernel_view(cache.v),
        k_scale,
        v_scale,
        meta.block_tables,
        meta.seq_lens,
        out,
        part_acc,
        part_ml,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *cache.k.stride()[:3],
        *scale_strides,
        meta.block_tables.stride(0),
        num_splits,
        split_len,
        sliding_window or 0,
        scale * LOG2E,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        QUANT=quant,
        HAS_WINDOW=sliding_window is not None,
        SINGLE_SPLIT=num_splits == 1,
        DOT_F32=dot_in_fp32(q.dtype),
        BLOCK_G=pow2(group, 16),
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        num_warps=4,
        num_stages=2 if INTERPRET else 3,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_ml,
            out.stride(0),
            out.stride(1),
            num_heads,
            num_splits,
            HEAD_DIM=head_dim,
            BLOCK_S=pow2(num_splits),
            BLOCK_D=block_d,
            num_warps=4 if block_d * num_splits >= 2048 else 1,
        )
    return out
