"""Small pieces every Triton kernel module shares: launch planning and cache-value codecs.

The interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors for the tests, but
it gets a few things wrong that compiled code gets right (bf16 ``tl.dot``, fp32→fp8 rounding).
The kernels therefore take paths that are right in both where one exists (an integer-op e4m3
encoder), and branch on the mode only where none does (fp32 dot operands, smaller tiles).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read at import, when this package's ``@triton.jit`` decorators ran and fixed the mode.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tests switch this on so outputs start as NaN and any element a kernel forgets to write shows
# up; in serving it stays off and outputs are plain ``torch.empty``.
POISON_OUTPUTS = os.environ.get("KVMESH_TRITON_POISON", "0") not in ("", "0")

LOG2E = 1.4426950408889634
# A finite "minus infinity" for running maxima: a row whose every key is masked then gives
# exp2(-inf - m) = 0 instead of exp2(-inf - -inf) = NaN.
NEG_BIG = tl.constexpr(-1.0e30)

KV_QUANT_NONE, KV_QUANT_INT8, KV_QUANT_FP8 = 0, 1, 2


def kv_quant_mode(dtype: torch.dtype) -> int:
    """Which cache codec a cache tensor of ``dtype`` uses (a constexpr of the kernels)."""
    if dtype == torch.int8:
        return KV_QUANT_INT8
    if dtype == torch.float8_e4m3fn:
        return KV_QUANT_FP8
    return KV_QUANT_NONE


def kernel_view(cache: torch.Tensor) -> torch.Tensor:
    """fp8 caches travel as raw bytes: the kernels encode and decode e4m3 themselves."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether attention's matmuls take fp32 operands: for fp32 models (exactness) and always
    under the interpreter, whose bf16/fp16 ``tl.dot`` is not trustworthy."""
    return INTERPRET or dtype == torch.float32


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small fixed number on CPU (interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation for every op: ``torch.empty``, NaN-filled when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(int(n)), at_least)


@triton.jit
def round_half_even(x):
    """Round fp32 ``x`` (|x| < 2**22) to the nearest integer, ties to even, like ``torch.round``.

    Adding 2**23 makes the FPU drop the fraction with its own round-to-nearest-even; reading the
    sum's bits back stops the compiler from folding ``(x + c) - c`` away. No libdevice needed.
    """
    mag = tl.abs(x) + 8388608.0
    rounded = (mag.to(tl.int32, bitcast=True) - 0x4B000000).to(tl.float32)
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def fp32_to_e4m3_bits(x):
    """fp32 → float8_e4m3fn bits (uint8), round to nearest even, saturating at ±448.

    Written with integer ops so the interpreter and the GPU give torch's bits exactly: normals
    round the fp32 mantissa to 3 bits (the carry may bump the exponent, which is right); values
    below 2**-6 become subnormals in steps of 2**-9, rounded by an fp32 add.
    """
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.uint32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) >> 20) - (120 << 3)
    sub = ((a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000) & 0xFF
    code = tl.where(a < 0.015625, sub, normal)
    sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80  # keeps -0.0 negative, as torch does
    return (code | sign).to(tl.uint8)


@triton.jit
def _load(ptrs, mask, other):
    """``tl.load`` that takes ``mask=None`` (``other`` is only allowed with a mask)."""
    if mask is None:
        vals = tl.load(ptrs)
    else:
        vals = tl.load(ptrs, mask=mask, other=other)
    return vals


@triton.jit
def load_kv(ptrs, mask, scale_ptrs, scale_mask, QUANT: tl.constexpr):
    """Load a K or V tile: as stored, or dequantised to fp32 (value = stored * per-head scale).

    fp8 arrives as raw bytes and is widened by the hardware convert (the interpreter widens
    e4m3 exactly too); masks may be None for tiles known to be in range.
    """
    if QUANT == 0:
        vals = _load(ptrs, mask, 0.0)
    else:
        raw = _load(ptrs, mask, 0)
        if QUANT == 2:
            raw = raw.to(tl.float8e4nv, bitcast=True)
        scale = _load(scale_ptrs, scale_mask, 0.0)
        vals = raw.to(tl.float32) * scale[:, None]
    return vals
