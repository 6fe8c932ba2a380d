"""The Triton backend: the hot-path ops, with the torch twins' exact signatures.

``kvmesh.kernels`` imports this module when the backend is Triton; each op lives in a small
module of its own (``triton_norm_rope``, ``triton_cache``, ``triton_attention_*``).
"""

from __future__ import annotations

import torch

from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer
from kvmesh.kernels.triton_attention_decode import decode_attention
from kvmesh.kernels.triton_attention_prefill import prefill_attention
from kvmesh.kernels.triton_cache import reshape_and_cache
from kvmesh.kernels.triton_norm_rope import rms_norm, rotary_embedding, silu_and_mul

__all__ = [
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "rotary_and_cache",
    "rotary_embedding",
    "silu_and_mul",
]


def rotary_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: KVCacheLayer,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """RoPE on ``q`` and ``k`` in place, then ``k`` and ``v`` into the cache; returns ``q``."""
    rotary_embedding(positions, q, k, cos_sin_cache)
    reshape_and_cache(k, v, cache, slot_mapping)
    return q


def paged_attention(
    q: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``q [T, H, D]`` over the paged cache → ``[T, H, D]``.

    A pure-decode batch (every query length 1, known from the host-side ``max_query_len``) takes
    the split-KV decode kernel; anything with a longer chunk takes the extend kernel, which also
    serves the batch's length-1 rows.
    """
    if meta.max_query_len <= 1:
        return decode_attention(q, cache, meta, scale, sliding_window)
    return prefill_attention(q, cache, meta, scale, sliding_window)
