"""Linear layers on a CPU through oneDNN, with each weight reordered ("packed") once at load.

``F.linear`` on a CPU hands a plain row-major weight to the BLAS on every call; oneDNN can
instead keep the weight in the blocked layout its matmul kernel reads, so the reorder is paid
once. Measured on a 2-core AMD EPYC (avx512f, avx512_bf16) with SmolLM2-135M's shapes, float32:
the fused gate/up projection (576 -> 3072) 2.9 -> 1.7 ms at 64 rows and 0.30 -> 0.09 ms at one
row; the 49,152-row LM head 55 -> 21 ms at 64 rows. bfloat16 gains less (1.0-2.6x).

The results are float32 sums in another order than the BLAS's, so they differ from
``F.linear`` in the last bits, as two BLAS builds do; greedy tokens stay those of the reference
models (the architecture tests check it with packing on).

``KVMESH_CPU_PACKED_LINEAR=0`` turns it off (for A/B measurements and as an escape hatch).
"""

from __future__ import annotations

import torch

from kvmesh.kernels.switches import env_switch

# The row count oneDNN tunes the packed layout for. Measured at 1-1,024 rows: packing for 64
# was as fast as or faster than packing for 1 everywhere but the LM head at one row (±10 %).
_BATCH_HINT = 64


def packing_enabled() -> bool:
    """Whether ``KVMESH_CPU_PACKED_LINEAR`` leaves packing on (the default)."""
    return env_switch("KVMESH_CPU_PACKED_LINEAR")


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack a CPU weight of ``dtype`` for oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    return False


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN tensor holding ``weight`` ([out, in], on the CPU) in matmul layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def packed_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the weight that ``pack_linear_weight`` packed."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class PackableLinear(torch.nn.Linear):
    """``nn.Linear`` that multiplies through a packed weight once ``pack()`` has run.

    Packing moves the weight into oneDNN's layout and leaves a meta-device parameter of the
    same shape and dtype behind, so the weight is not held twice and the model's parameter
    count and bytes still read true. Load weights before packing; a packed layer cannot be
    loaded or moved again."""

    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def pack(self) -> None:
        if self.packed_weight is not None:
            return
        self.packed_weight = pack_linear_weight(self.weight)
        self.weight = torch.nn.Parameter(
            torch.empty_like(self.weight, device="meta"), requires_grad=False
        )
