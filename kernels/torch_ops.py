"""Torch twins of every kernel: the reference path, and the one CPU runs.

Each function has the same signature as its Triton sibling in ``kernels/triton_*.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual) * weight, x + residual)``; the sum is the next residual.

    Computed in float32 and cast back, as transformers does, so greedy outputs match it.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, KVH, D]`` in place (NeoX / rotate-half layout).

    ``cos_sin_cache[pos]`` holds ``cos`` in its first ``D/2`` entries and ``sin`` in the rest.
    """
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions]
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)
    for x in (q, k):
        x1 = x[..., :half].clone()
        x2 = x[..., half : 2 * half]
        x[..., :half] = x1 * cos - x2 * sin
        x[..., half : 2 * half] = x2 * cos + x1 * sin


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate/up projection output."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def quantize_per_head(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(token, head) quantisation of ``x [T, KVH, D]`` → (values, scales [T, KVH])."""
    qmax = INT8_MAX if dtype == torch.int8 else FP8_MAX
    amax = x.float().abs().amax(dim=-1).clamp_min(1e-8)
    scale = amax / qmax
    scaled = x.float() / scale[..., None]
    if dtype == torch.int8:
        scaled = scaled.round().clamp(-INT8_MAX, INT8_MAX)
    return scaled.to(dtype), scale


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, cache: KVCacheLayer, slot_mapping: torch.Tensor
) -> None:
    """Write new ``key``/``value [T, KVH, D]`` into the paged cache at ``slot_mapping [T]``.

    Slots of -1 (padding) are skipped. A quantised cache stores values and per-head scales.
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    num_heads, head_dim = cache.k.shape[2], cache.k.shape[3]
    k_flat = cache.k.view(-1, num_heads, head_dim)
    v_flat = cache.v.view(-1, num_heads, head_dim)
    if cache.quantized:
        kq, ks = quantize_per_head(key, cache.k.dtype)
        vq, vs = quantize_per_head(value, cache.v.dtype)
        k_flat[slot_mapping] = kq
        v_flat[slot_mapping] = vq
        cache.k_scale.view(-1, num_heads)[slot_mapping] = ks
        cache.v_scale.view(-1, num_heads)[slot_mapping] = vs
    else:
        k_flat[slot_mapping] = key.to(cache.k.dtype)
        v_flat[slot_mapping] = value.to(cache.v.dtype)


def _gather_kv(
    cache: KVCacheLayer, block_tables: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of ``block_tables [B, NB]`` as ``[B, NB * block_size, KVH, D]`` in ``dtype``."""
    b, nb = block_tables.shape
    k = cache.k[block_tables]
    v = cache.v[block_tables]
    if cache.quantized:
        k = k.to(dtype) * cache.k_scale[block_tables][..., None].to(dtype)
        v = v.to(dtype) * cache.v_scale[block_tables][..., None].to(dtype)
    else:
        k, v = k.to(dtype), v.to(dtype)
    bs, kvh, d = cache.k.shape[1:]
    return k.reshape(b, nb * bs, kvh, d), v.reshape(b, nb * bs, kvh, d)


def paged_attention(
    q: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``q [T, H, D]`` over the paged cache → ``[T, H, D]``.

    Each sequence's new tokens attend to its cached prefix plus themselves, causally (and only
    to the last ``sliding_window`` positions when set). The new tokens' K/V must already be in
    the cache. Decodes (one query token) are batched into one padded matmul; prefill chunks
    run one sequence at a time through SDPA.
    """
    out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = cache.k.shape[2], cache.k.shape[1]
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc.tolist() if q.is_cuda else None
    qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
    decode_ids = [i for i, n in enumerate(qlens) if n == 1]
    token_starts = starts or _cumsum(qlens)

    if decode_ids:
        idx = torch.tensor(decode_ids, device=q.device)
        tok = torch.tensor([token_starts[i] for i in decode_ids], device=q.device)
        lens = meta.seq_lens[idx].to(torch.long)
        max_len = max(slens[i] for i in decode_ids)
        nb = -(-max_len // block_size)
        k, v = _gather_kv(cache, meta.block_tables[idx, :nb], q.dtype)
        qd = q[tok].view(len(decode_ids), num_kv_heads, group, head_dim)
        # scores [B, KVH, G, L]
        scores = torch.matmul(qd, k.permute(0, 2, 3, 1)) * scale
        pos = torch.arange(k.shape[1], device=q.device)
        masked = pos[None, :] >= lens[:, None]
        if sliding_window is not None:
            masked |= pos[None, :] < (lens[:, None] - sliding_window)
        scores.masked_fill_(masked[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        od = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, KVH, G, D]
        out[tok] = od.reshape(len(decode_ids), num_heads, head_dim)

    for i, n in enumerate(qlens):
        if n == 1:
            continue
        start, ctx = token_starts[i], slens[i]
        nb = -(-ctx // block_size)
        k, v = _gather_kv(cache, meta.block_tables[i : i + 1, :nb], q.dtype)
        k, v = k[0, :ctx].transpose(0, 1), v[0, :ctx].transpose(0, 1)  # [KVH, ctx, D]
        qi = q[start : start + n].transpose(0, 1)  # [H, n, D]
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        oi = F.scaled_dot_product_attention(
            qi, k, v, attn_mask=allowed, scale=scale, enable_gqa=group > 1
        )
        out[start : start + n] = oi.transpose(0, 1)
    return out


def _cumsum(lens: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lens:
        starts.append(total)
        total += n
    return starts
