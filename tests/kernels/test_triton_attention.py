"""Paged attention: the decode (split-KV) and extend kernels (interpreted) vs the torch twin.

The kernel reads a cache where every slot past a sequence's length and every unused block is
NaN (or a junk code), so a read out of bounds shows; the twin reads the same values with zeros
there, as the engine's zero-filled cache holds them. Outputs start as NaN (see conftest).
"""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh.kernels import torch_ops, triton_ops
from kvmesh.kernels.triton_attention_decode import decode_attention
from kvmesh.kernels.triton_attention_prefill import prefill_attention

DTYPES = [torch.float32, torch.float16]
GROUPS = [(2, 2), (6, 2), (8, 1)]  # (heads, kv heads): GQA ratios 1, 3, and 8 (MQA)


def _check(out, batch, scale, window, tol, seed, dtype):
    # The pure-torch twin, not the C++ CPU kernels (tested against it in their own file).
    native, torch_ops.USE_CPU_NATIVE = torch_ops.USE_CPU_NATIVE, False
    try:
        ref = torch_ops.paged_attention(batch.q, batch.twin_cache, batch.meta, scale, window)
    finally:
        torch_ops.USE_CPU_NATIVE = native
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), f"unwritten or NaN-tainted output (seed={seed})"
    # Quantised caches dequantise in fp32 here and in the activation dtype in the twin.
    torch.testing.assert_close(out, ref, **tol(dtype), msg=f"seed={seed}")


def _decode_chunks(n: int, block_size: int) -> list[tuple[int, int]]:
    """Context lengths that are not multiples of the block size, one of them tiny."""
    lens = [random.randrange(1, 4 * block_size) for _ in range(n - 1)] + [0]
    return [(ln if ln % block_size else ln + 1, 1) for ln in lens]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_matches_twin(seed, tol, paged_batch, dtype, heads, kv_heads, num_splits):
    random.seed(seed)
    block_size = 8
    batch = paged_batch(_decode_chunks(3, block_size), heads, kv_heads, 16, block_size, dtype)
    scale = 16**-0.5
    out = decode_attention(batch.q, batch.cache, batch.meta, scale, None, num_splits=num_splits)
    _check(out, batch, scale, None, tol, seed, dtype)


def _extend_chunks(block_size: int) -> list[tuple[int, int]]:
    """A packed mix: a fresh prefill, an extend over a cached prefix, a decode row, and a
    chunk longer than one query tile; no length a multiple of the block size."""
    return [
        (0, random.randrange(2, 20)),
        (random.randrange(1, 3 * block_size), random.randrange(2, 12)),
        (random.randrange(1, 3 * block_size), 1),
        (random.randrange(0, block_size), random.randrange(17, 35)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
def test_extend_matches_twin(seed, tol, paged_batch, dtype, heads, kv_heads):
    random.seed(seed)
    block_size = 16
    batch = paged_batch(_extend_chunks(block_size), heads, kv_heads, 16, block_size, dtype)
    scale = 0.3
    out = prefill_attention(batch.q, batch.cache, batch.meta, scale, None)
    _check(out, batch, scale, None, tol, seed, dtype)


@pytest.mark.parametrize("kind", ["decode", "extend"])
@pytest.mark.parametrize("window", [1, 5, 21])
def test_sliding_window(seed, tol, paged_batch, kind, window):
    random.seed(seed)
    block_size = 8
    chunks = _decode_chunks(3, block_size) if kind == "decode" else _extend_chunks(block_size)
    batch = paged_batch(chunks, 6, 2, 16, block_size, torch.float32)
    out = triton_ops.paged_attention(batch.q, batch.cache, batch.meta, 0.25, window)
    _check(out, batch, 0.25, window, tol, seed, torch.float32)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", ["decode", "extend"])
@pytest.mark.parametrize("window", [None, 7])
def test_quantised_cache(seed, tol, paged_batch, kv_dtype, kind, window):
    random.seed(seed)
    block_size = 16
    chunks = _decode_chunks(3, block_size) if kind == "decode" else _extend_chunks(block_size)
    batch = paged_batch(chunks, 6, 2, 16, block_size, torch.float32, kv_dtype)
    out = triton_ops.paged_attention(batch.q, batch.cache, batch.meta, 0.25, window)
    _check(out, batch, 0.25, window, tol, seed, torch.float32)


@pytest.mark.parametrize(("head_dim", "block_size"), [(32, 32), (64, 64), (96, 8)])
@pytest.mark.parametrize("kind", ["decode", "extend"])
def test_head_dims_and_block_sizes(seed, tol, paged_batch, head_dim, block_size, kind):
    """Model head dims (96 is not a power of two: padded and masked) and page sizes 8-64."""
    random.seed(seed)
    chunks = _decode_chunks(2, block_size) if kind == "decode" else _extend_chunks(block_size)[:2]
    batch = paged_batch(chunks, 4, 2, head_dim, block_size, torch.float16)
    scale = head_dim**-0.5
    out = triton_ops.paged_attention(batch.q, batch.cache, batch.meta, scale, None)
    _check(out, batch, scale, None, tol, seed, torch.float16)


def test_dispatch_sends_pure_decode_to_the_decode_kernel(seed, paged_batch, monkeypatch):
    random.seed(seed)
    calls = []
    monkeypatch.setattr(triton_ops, "decode_attention", lambda *a: calls.append("decode") or 0)
    monkeypatch.setattr(triton_ops, "prefill_attention", lambda *a: calls.append("extend") or 0)
    decode = paged_batch(_decode_chunks(2, 8), 2, 2, 16, 8, torch.float32)
    mixed = paged_batch(_extend_chunks(8), 2, 2, 16, 8, torch.float32)
    triton_ops.paged_attention(decode.q, decode.cache, decode.meta, 1.0)
    triton_ops.paged_attention(mixed.q, mixed.cache, mixed.meta, 1.0)
    assert calls == ["decode", "extend"]


def test_extend_kernel_alone_serves_decode_rows(seed, tol, paged_batch):
    """The extend kernel must also be right when every row is a decode (mixed batches)."""
    random.seed(seed)
    batch = paged_batch(_decode_chunks(3, 8), 6, 2, 16, 8, torch.float32)
    out = prefill_attention(batch.q, batch.cache, batch.meta, 0.25, None)
    _check(out, batch, 0.25, None, tol, seed, torch.float32)
