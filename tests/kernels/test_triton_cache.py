"""Paged K/V writes, plain and quantised: Triton (interpreted) vs torch twin, bit for bit."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kvmesh.kernels import torch_ops, triton_ops
from kvmesh.kernels.metadata import KVCacheLayer
from kvmesh.kernels.triton_common import fp32_to_e4m3_bits, round_half_even

QUANTISED = (torch.int8, torch.float8_e4m3fn)


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A cache full of values no write produces: NaN, the e4m3 NaN code, or int8 -128."""
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, 0x7F, dtype=torch.uint8).view(dtype)
    if dtype == torch.int8:
        return torch.full(shape, -128, dtype=dtype)
    return torch.full(shape, float("nan"), dtype=dtype)


def _make_cache(blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> KVCacheLayer:
    shape = (blocks, block_size, kv_heads, head_dim)
    if dtype in QUANTISED:
        scales = [torch.full(shape[:3], float("nan")) for _ in range(2)]
        return KVCacheLayer(_poisoned(shape, dtype), _poisoned(shape, dtype), *scales)
    return KVCacheLayer(_poisoned(shape, dtype), _poisoned(shape, dtype))


def _clone(cache: KVCacheLayer) -> KVCacheLayer:
    return KVCacheLayer(
        *(
            t.clone() if t is not None else None
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)
        )
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so NaN == NaN and -0.0 != 0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


CACHE_CASES = [(torch.float32, torch.float32), (torch.float16, torch.float16)] + [
    (q, a) for q in QUANTISED for a in (torch.float32, torch.float16)
]


@pytest.mark.parametrize(
    ("cache_dtype", "act_dtype"),
    CACHE_CASES,
    ids=[f"{str(c).split('.')[-1]}-from-{str(a).split('.')[-1]}" for c, a in CACHE_CASES],
)
@pytest.mark.parametrize(("kv_heads", "head_dim", "block_size"), [(1, 16, 8), (3, 32, 16)])
def test_reshape_and_cache_matches_twin(
    seed, cache_dtype, act_dtype, kv_heads, head_dim, block_size
):
    blocks, tokens = 6, 13
    # Distinct slots scattered over the pool, a few of them padding (-1).
    slots = torch.randperm(blocks * block_size)[:tokens]
    slots[torch.rand(tokens) < 0.25] = -1
    # key/value as the model passes them: strided views into the fused QKV output.
    qkv = torch.randn(tokens, 3 * kv_heads * head_dim, dtype=act_dtype) * 5
    qkv[0, kv_heads * head_dim] = 0.0  # an all-zero-ish head still gets a finite scale
    key = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, 2 * kv_heads * head_dim :].view(tokens, kv_heads, head_dim)
    cache = _make_cache(blocks, block_size, kv_heads, head_dim, cache_dtype)
    ref = _clone(cache)

    triton_ops.reshape_and_cache(key, value, cache, slots)
    torch_ops.reshape_and_cache(key, value, ref, slots)

    for name in ("k", "v", "k_scale", "v_scale"):
        got, want = getattr(cache, name), getattr(ref, name)
        if want is None:
            continue
        assert torch.equal(_bits(got), _bits(want)), f"{name} differs (seed={seed})"
    # Padding slots were skipped and everything else is still poisoned.
    written = torch.zeros(blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = _bits(cache.k).view(blocks * block_size, -1)[~written]
    assert torch.equal(untouched, _bits(_poisoned(tuple(untouched.shape), cache_dtype)))


def _codec_kernel(x_ptr, rounded_ptr, e4m3_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(rounded_ptr + offs, round_half_even(x), mask=mask)
    tl.store(e4m3_ptr + offs, fp32_to_e4m3_bits(x), mask=mask)


def test_codecs_round_like_torch(seed):
    """Ties, subnormal steps, the largest finite e4m3, signed zeros, and random values."""
    special = [0.0, -0.0, 0.5, 1.5, 2.5, -2.5, 126.5, -126.5, 448.0, -448.0, 447.9, 2.0**-6]
    special += [k * 2.0**-10 for k in range(-20, 21)]  # around and below the subnormal steps
    special += [(8 + m + 0.5) * 2.0 ** (e - 3) for e in range(-6, 8) for m in range(8)]  # ties
    randoms = (torch.randn(400) * torch.logspace(-4, 2.6, 400)).tolist()
    x = torch.tensor(special + randoms, dtype=torch.float32).clamp(-448, 448)
    rounded = torch.empty_like(x)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    # jit here, not at import: only inside a test is TRITON_INTERPRET set (see conftest).
    kernel = triton.jit(_codec_kernel)
    kernel[(1,)](x, rounded, codes, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(rounded, x.round()), f"seed={seed}"
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (codes != want).nonzero().flatten()
    assert bad.numel() == 0, f"seed={seed}: {x[bad][:8].tolist()} -> {codes[bad][:8].tolist()}"
