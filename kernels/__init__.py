"""Kernels for the hot path: Triton on CUDA, torch twins elsewhere.

``KVMESH_KERNELS=triton|torch`` overrides the choice. Everything else imports the ops from here,
so this is the one dispatch point.
"""

from __future__ import annotations

import os

from kvmesh.kernels import torch_ops
from kvmesh.kernels.cpu_linear import (
    PackableLinear,
    PackedWeight,
    pack_linear_weight,
    packed_linear,
    packing_enabled,
    packing_supported,
)
from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer


def kernel_backend() -> str:
    """``"triton"`` or ``"torch"``: the override if set, else Triton only where CUDA is."""
    forced = os.environ.get("KVMESH_KERNELS", "").strip().lower()
    if forced in ("triton", "torch"):
        return forced
    if forced:
        raise ValueError(f"KVMESH_KERNELS must be 'triton' or 'torch', got {forced!r}")
    import torch

    return "triton" if torch.cuda.is_available() else "torch"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX-512-BF16).

    Measured on a 2-core AMD EPYC with avx512_bf16: a bfloat16 ``F.linear`` at 16-512 rows ran
    2.8-4.7x the float32 one (oneDNN); on AVX2-only machines bfloat16 is 3-9x *slower*, which
    is why this is read from the CPU's flags at run time and never assumed."""
    from kvmesh.kernels.cpu_native import cpu_flags

    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_flags().split()))


def _ops():
    if kernel_backend() == "triton":
        from kvmesh.kernels import triton_ops

        return triton_ops
    return torch_ops


_BACKEND = _ops()
rms_norm = _BACKEND.rms_norm
rotary_embedding = _BACKEND.rotary_embedding
silu_and_mul = _BACKEND.silu_and_mul
reshape_and_cache = _BACKEND.reshape_and_cache
rotary_and_cache = _BACKEND.rotary_and_cache
paged_attention = _BACKEND.paged_attention

__all__ = [
    "AttentionMetadata",
    "KVCacheLayer",
    "PackableLinear",
    "PackedWeight",
    "kernel_backend",
    "pack_linear_weight",
    "packed_linear",
    "packing_enabled",
    "packing_supported",
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "rotary_and_cache",
    "rotary_embedding",
    "silu_and_mul",
]
