"""Kernel tests: the Triton kernels run under the interpreter on CPU and are compared with
their torch twins on fresh random inputs every run.

``@triton.jit`` picks interpreter or compiler when it is applied, so the kernel modules are
imported here with ``TRITON_INTERPRET=1`` set. Triton reads the variable again at launch, so an
autouse fixture sets it around each kernel test; between them it is put back, so that the rest
of the session (and the subprocesses and Ray workers it starts) does not inherit it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from kvmesh.kernels import triton_common, triton_ops  # noqa: F401  (jit applied here)
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

if not triton_common.INTERPRET:
    raise RuntimeError(
        "kvmesh.kernels.triton_* were imported before tests/kernels/conftest.py could switch on "
        "TRITON_INTERPRET; run the kernel tests in their own process"
    )
# Outputs start as NaN: an element a kernel forgets to write fails the comparison.
triton_common.POISON_OUTPUTS = True

from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (``KVMESH_TEST_SEED`` replays one); printed, so a failure shows it."""
    value = int(os.environ.get("KVMESH_TEST_SEED") or secrets.randbelow(2**31))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with KVMESH_TEST_SEED={value})")
    return value


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}


@pytest.fixture
def tol() -> Callable[[torch.dtype], dict[str, float]]:
    return tolerance


@dataclass
class PagedBatch:
    q: torch.Tensor
    cache: KVCacheLayer  # the kernel's view: NaN (or junk codes) wherever nothing was written
    twin_cache: KVCacheLayer  # the same values with finite zeros there, as the engine keeps it
    meta: AttentionMetadata


def _junk_like(t: torch.Tensor) -> torch.Tensor:
    """Values a kernel must never read: NaN, or for quantised caches the e4m3 NaN / int8 -128."""
    if t.dtype == torch.float8_e4m3fn:
        return torch.full(t.shape, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    if t.dtype == torch.int8:
        return torch.full(t.shape, -128, dtype=torch.int8)
    return torch.full(t.shape, float("nan"), dtype=t.dtype)


def make_paged_batch(
    chunks: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
) -> PagedBatch:
    """Random packed batch: sequence ``i`` has ``chunks[i] = (cached, new)`` tokens.

    Its blocks are scattered through the pool in random order; block 0 stays unused (the twin
    reads it through the zero padding of block tables). Every slot past a sequence's length and
    every unused block is junk in the kernel's cache and zero in the twin's.
    """
    kv_dtype = kv_dtype or dtype
    needed = [-(-(ctx + new) // block_size) for ctx, new in chunks]
    num_blocks = sum(needed) + 3
    order = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    quantised = kv_dtype in (torch.int8, torch.float8_e4m3fn)

    def values() -> torch.Tensor:
        if kv_dtype == torch.int8:
            return torch.randint(-127, 128, shape, dtype=torch.int8)
        if kv_dtype == torch.float8_e4m3fn:
            return (torch.randn(shape) * 100).clamp(-448, 448).to(kv_dtype)
        return torch.randn(shape, dtype=kv_dtype)

    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for (ctx, new), table in zip(chunks, tables, strict=True):
        flat = written[table].flatten()
        flat[: ctx + new] = True
        written[table] = flat.view(len(table), block_size)

    def pair(t: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = written.view(*written.shape, *([1] * (t.dim() - 2)))
        return _masked(t, mask, _junk_like(t)), _masked(t, mask, zero)

    parts = [values(), values()]  # k, v
    if quantised:
        parts += [torch.rand(shape[:3]) * 0.02 + 0.001 for _ in range(2)]  # k_scale, v_scale
    pairs = [pair(t, torch.zeros_like(t)) for t in parts]
    kernel_cache = KVCacheLayer(*(kernel for kernel, _ in pairs))
    twin_cache = KVCacheLayer(*(twin for _, twin in pairs))

    meta = AttentionMetadata.for_chunks(chunks, tables)
    q = torch.randn(sum(meta.query_lens_cpu), num_heads, head_dim, dtype=dtype)
    return PagedBatch(q, kernel_cache, twin_cache, meta)


def _masked(t: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``where(mask, t, fill)`` for any dtype (fp8 has no ``torch.where``: go through bytes)."""
    if t.dtype == torch.float8_e4m3fn:
        out = torch.where(mask, t.view(torch.uint8), fill.view(torch.uint8))
        return out.view(torch.float8_e4m3fn)
    return torch.where(mask, t, fill)


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return make_paged_batch
