"""Linear layers on a CPU through oneDNN, with each weight reordered ("packed") once at load.

``F.linear`` on a CPU hands a plain row-major weight to the BLAS on every call; oneDNN can
instead keep the weight in the blocked layout its matmul kernel reads, so the reorder is paid
once. Measured on a 2-core AMD EPYC (avx512f, avx512_bf16) with SmolLM2-135M's shapes, float32:
the fused gate/up projection (576 -> 3072) 2.9 -> 1.7 ms at 64 rows and 0.30 -> 0.09 ms at one
row; the 49,152-row LM head 55 -> 21 ms at 64 rows. bfloat16 gains less (1.0-2.6x).

The results are float32 sums in another order than the BLAS's, so they differ from
``F.linear`` in the last bits, as two BLAS builds do; greedy tokens stay those of the reference
models (the architecture tests check it with packing on).

bfloat16 weights on a CPU with AVX512-BF16 and no AMX (AMD Zen 4) go to kvmesh's own kernel
instead (``csrc/linear_bf16_cpu.h``): there oneDNN's packed bfloat16 matmul reached ~58 % of the
CPU's peak at 16 rows and streamed one-row weights at half the memory's speed; the kernel took a
2-core Zen 4's SmolLM2 step linears from 13.3 to 8.4 ms at one row, 17.6 to 13.5 ms at 16, and
matched oneDNN from 256 rows on. Where AMX is present oneDNN multiplies on its tiles and stays.

``KVMESH_CPU_PACKED_LINEAR=0`` turns packing off (for A/B measurements and as an escape hatch);
``KVMESH_CPU_BF16_DOT_LINEAR=0`` keeps oneDNN for bfloat16 where the kernel would be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from kvmesh.kernels import cpu_native
from kvmesh.kernels.switches import env_switch

# The row count oneDNN tunes the packed layout for. Measured at 1-1,024 rows: packing for 64
# was as fast as or faster than packing for 1 everywhere but the LM head at one row (±10 %).
_BATCH_HINT = 64


def packing_enabled() -> bool:
    """Whether ``KVMESH_CPU_PACKED_LINEAR`` leaves packing on (the default)."""
    return env_switch("KVMESH_CPU_PACKED_LINEAR")


@dataclass(frozen=True)
class BF16DotWeight:
    """A bfloat16 weight packed for the AVX512-BF16 kernel: ``data`` [ceil(N/16), K/2, 16, 2]."""

    data: torch.Tensor
    out_features: int


def bf16_dot_kernel() -> ModuleType | None:
    """The native module when its AVX512-BF16 linear serves bfloat16 weights here, else None:
    switched on (``KVMESH_CPU_BF16_DOT_LINEAR``), built for AVX512-BF16, and no AMX (there
    oneDNN's tiles are the faster path)."""
    if not env_switch("KVMESH_CPU_BF16_DOT_LINEAR"):
        return None
    if "amx_bf16" in cpu_native.cpu_flags().split():
        return None
    ops = cpu_native.native_ops()
    return ops if ops is not None and ops.bf16_dot_linear_available() else None


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether a CPU weight of ``dtype`` can be packed here (for kvmesh's bfloat16 kernel or
    for oneDNN)."""
    if dtype == torch.bfloat16 and bf16_dot_kernel() is not None:
        return True
    return packing_supported_by_onednn(dtype)


def packing_supported_by_onednn(dtype: torch.dtype) -> bool:
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


PackedWeight = torch.Tensor | BF16DotWeight
"""What ``pack_linear_weight`` returns: an opaque oneDNN tensor, or a ``BF16DotWeight``."""


def pack_linear_weight(weight: torch.Tensor) -> PackedWeight:
    """``weight`` ([out, in], on the CPU) in the layout its matmul reads: kvmesh's bfloat16
    kernel's where ``bf16_dot_kernel`` offers it (even ``in``), else oneDNN's."""
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0:
        ops = bf16_dot_kernel()
        if ops is not None:
            return BF16DotWeight(ops.pack_bf16_dot_weight(weight), weight.shape[0])
    return torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)


def packed_linear(
    x: torch.Tensor, packed_weight: PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the weight that ``pack_linear_weight`` packed."""
    if isinstance(packed_weight, BF16DotWeight):
        n = packed_weight.out_features
        rows = x.reshape(-1, x.shape[-1])
        y = cpu_native.native_ops().linear_bf16_dot(rows, packed_weight.data, bias, n)
        return y.view(*x.shape[:-1], n)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class PackableLinear(torch.nn.Linear):
    """``nn.Linear`` that multiplies through a packed weight once ``pack()`` has run.

    Packing moves the weight into oneDNN's layout and leaves a meta-device parameter of the
    same shape and dtype behind, so the weight is not held twice and the model's parameter
    count and bytes still read true. Load weights before packing; a packed layer cannot be
    loaded or moved again."""

    packed_weight: PackedWeight | None = None

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
