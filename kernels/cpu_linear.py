"""Linear layers on a CPU through a weight reordered ("packed") once at load: into the layout of
kvmesh's own AVX-512 kernel where it serves, else into oneDNN's.

``F.linear`` on a CPU hands a plain row-major weight to the BLAS on every call; a packed weight
sits in the blocked layout the matmul kernel reads, so the reorder is paid once. oneDNN,
measured on a 2-core AMD EPYC (avx512f, avx512_bf16) with SmolLM2-135M's shapes, float32: the
fused gate/up projection (576 -> 3072) 2.9 -> 1.7 ms at 64 rows and 0.30 -> 0.09 ms at one
row; the 49,152-row LM head 55 -> 21 ms at 64 rows. bfloat16 gains less (1.0-2.6x).

The results are float32 sums in another order than the BLAS's, so they differ from
``F.linear`` in the last bits, as two BLAS builds do; greedy tokens stay those of the reference
models (the architecture tests check it with packing on).

On a CPU with AVX-512 kvmesh's own kernel serves (``csrc/linear_cpu.h``: float32 with
AVX-512F; bfloat16 with AVX512-BF16 and no AMX, where oneDNN multiplies on the AMX tiles).
oneDNN's packed matmul left much of the CPU unused at decode sizes: on a 2-core Zen 4 with
SmolLM2's step (30 layers and the LM head, distinct weights; ``bench/cpu_linear_bench.py``)
the kernel took bfloat16 from 14.1 to 8.7 ms at one row and 18.0 to 13.6 ms at 16, float32
from 23.1 to 15.3 ms at one row and 31.0 to 24.1 at 16, and matched oneDNN from 256 rows on.

``KVMESH_CPU_PACKED_LINEAR=0`` turns packing off (for A/B measurements and as an escape hatch);
``KVMESH_CPU_DOT_LINEAR=0`` keeps oneDNN where the kernel would be chosen.
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
class DotWeight:
    """A weight packed for kvmesh's AVX-512 kernel: ``data`` [ceil(N/16), K/depth, 16, depth]
    (depth 2 for bfloat16's feature pairs, 1 for float32)."""

    data: torch.Tensor
    out_features: int


def dot_linear_kernel(dtype: torch.dtype) -> ModuleType | None:
    """The native module when its AVX-512 linear serves ``dtype`` weights here, else None:
    switched on (``KVMESH_CPU_DOT_LINEAR``), built for the dtype (float32: AVX-512F; bfloat16:
    AVX512-BF16), and for bfloat16 no AMX (oneDNN's tiles are the faster path there)."""
    if dtype not in (torch.float32, torch.bfloat16) or not env_switch("KVMESH_CPU_DOT_LINEAR"):
        return None
    if dtype == torch.bfloat16 and "amx_bf16" in cpu_native.cpu_flags().split():
        return None
    ops = cpu_native.native_ops()
    return ops if ops is not None and ops.dot_linear_available(dtype) else None


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether a CPU weight of ``dtype`` can be packed here (for kvmesh's kernel or oneDNN)."""
    return dot_linear_kernel(dtype) is not None or packing_supported_by_onednn(dtype)


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


PackedWeight = torch.Tensor | DotWeight
"""What ``pack_linear_weight`` returns: an opaque oneDNN tensor, or a ``DotWeight``."""


def pack_linear_weight(weight: torch.Tensor) -> PackedWeight:
    """``weight`` ([out, in], on the CPU) in the layout its matmul reads: kvmesh's kernel's
    where ``dot_linear_kernel`` offers it (for bfloat16, an even ``in``), else oneDNN's."""
    weight = weight.detach().contiguous()
    ops = dot_linear_kernel(weight.dtype)
    if ops is not None and (weight.dtype == torch.float32 or weight.shape[1] % 2 == 0):
        return DotWeight(ops.pack_dot_linear_weight(weight), weight.shape[0])
    return pack_for_onednn(weight)


def pack_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN tensor holding ``weight`` ([out, in], on the CPU) in matmul layout,
    whatever ``dot_linear_kernel`` says (``packed_linear`` multiplies through it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def packed_linear(
    x: torch.Tensor, packed_weight: PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the weight that ``pack_linear_weight`` packed."""
    if isinstance(packed_weight, DotWeight):
        n = packed_weight.out_features
        rows = x.reshape(-1, x.shape[-1])
        y = cpu_native.native_ops().dot_linear(rows, packed_weight.data, bias, n)
        return y.view(*x.shape[:-1], n)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class PackableLinear(torch.nn.Linear):
    """``nn.Linear`` that multiplies through a packed weight once ``pack()`` has run.

    Packing moves the weight into the packed layout and leaves a meta-device parameter of the
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
