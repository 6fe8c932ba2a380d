"""Rotary position embedding tables: default, linear, dynamic-NTK and llama3 scaling.

Formulas follow transformers' ``modeling_rope_utils`` so greedy output matches it bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _table(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    freqs = positions[:, None].float() * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def build_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    base: float,
    scaling: dict[str, Any] | None,
    original_max_positions: int,
) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos in the first half of each row, sin in the rest.

    Dynamic NTK: positions inside the original context use the unscaled frequencies (as
    transformers does for sequences that fit); positions beyond it use the base rescaled for
    ``max_positions``. transformers instead rescales a whole sequence once it grows past the
    original context, which makes its K/V depend on the sequence's current length; a paged cache
    cannot rewrite old K/V, so we use one fixed table, as vLLM does.
    """
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    positions = torch.arange(max_positions)
    inv_freq = _base_inv_freq(base, head_dim)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    table = _table(inv_freq, positions)
    if kind == "dynamic" and max_positions > original_max_positions:
        factor = scaling["factor"]
        seq_len = max_positions
        scaled_base = base * ((factor * seq_len / original_max_positions) - (factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        beyond = positions[original_max_positions:]
        table[original_max_positions:] = _table(_base_inv_freq(scaled_base, head_dim), beyond)
    return table
