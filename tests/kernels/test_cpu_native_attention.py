"""The C++ CPU attention kernels (``kernels/cpu_native``) vs the torch twin.

The kernels read a cache where every slot past a sequence's length and every unused block is
NaN, so a read out of bounds shows; the twin (``USE_CPU_NATIVE`` off: SDPA over gathered K/V)
reads the same values with zeros there. Shapes cover the decode kernel's unrolled head dims
(64, 128) and its generic path (40), GQA ratios 1, 3 and 8, several block sizes, ragged
lengths, sliding windows, chunks with and without cached context, and a batch-1 decode long
enough to be split across threads and merged; each over a float32 and a bfloat16 cache (float32
queries and arithmetic either way: the twin widens the same bfloat16 values as it gathers).
"""

from __future__ import annotations

import platform
import random
import shutil
import subprocess

import pytest
import torch

from kvmesh.kernels import cpu_native, torch_ops


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    """Build (or load) the kernels when the tests run, not at collection."""
    if cpu_native.native_ops() is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")


GROUPS = [(2, 2), (9, 3), (8, 1)]  # (heads, kv heads): GQA ratios 1, 3 (SmolLM2), 8 (MQA)
CACHE_DTYPES = pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])


def _reference(batch, scale, window, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(torch_ops, "USE_CPU_NATIVE", False)
        return torch_ops.paged_attention(batch.q, batch.twin_cache, batch.meta, scale, window)


def _native(batch, scale, window):
    assert torch_ops.USE_CPU_NATIVE and torch_ops._native_ops(batch.q, batch.cache) is not None
    return torch_ops.paged_attention(batch.q, batch.cache, batch.meta, scale, window)


def _check(out, ref, seed):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), f"NaN in the output: a junk slot was read (seed={seed})"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=f"seed={seed}")


@pytest.fixture
def more_threads():
    """At least 2 torch threads, so the kernels' split and merge paths run on any machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(2, saved))
    yield
    torch.set_num_threads(saved)


@CACHE_DTYPES
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize(("block_size", "head_dim"), [(16, 64), (8, 128), (32, 40), (1, 64)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_matches_twin(
    seed, paged_batch, monkeypatch, heads, kv_heads, block_size, head_dim, window, kv_dtype
):
    random.seed(seed)
    # Ragged: tiny, not a multiple of the block size, several blocks.
    lens = [1, random.randrange(2, 3 * block_size + 5), random.randrange(1, 200), 64]
    batch = paged_batch(
        [(n - 1, 1) for n in lens], heads, kv_heads, head_dim, block_size, torch.float32, kv_dtype
    )
    scale = head_dim**-0.5
    _check(_native(batch, scale, window), _reference(batch, scale, window, monkeypatch), seed)


@CACHE_DTYPES
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize("window", [None, 100])
def test_batch1_long_decode_splits_across_threads(
    seed, paged_batch, monkeypatch, more_threads, heads, kv_heads, window, kv_dtype
):
    """A single sequence with a long context: split into key ranges whose partial softmax
    states are merged (a wrong merge weight or a lost part shows as a mismatch)."""
    random.seed(seed)
    ctx = random.randrange(1500, 2500)
    batch = paged_batch([(ctx, 1)], heads, kv_heads, 64, 16, torch.float32, kv_dtype)
    _check(_native(batch, 0.125, window), _reference(batch, 0.125, window, monkeypatch), seed)


def _extend_chunks(block_size: int) -> list[tuple[int, int]]:
    """A fresh prefill, extends over a cached prefix (prefix-cache hit, chunked-prefill
    continuation), a decode row, a chunk longer than one query tile; no length a multiple of
    the block size."""
    return [
        (0, random.randrange(2, 30)),
        (random.randrange(1, 3 * block_size), random.randrange(2, 12)),
        (random.randrange(1, 3 * block_size), 1),
        (random.randrange(1, block_size), random.randrange(70, 90)),
        (random.randrange(100, 300), random.randrange(20, 40)),
    ]


@CACHE_DTYPES
@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize(("block_size", "head_dim"), [(16, 64), (8, 128), (32, 40)])
@pytest.mark.parametrize("window", [None, 1, 21])
def test_extend_matches_twin(
    seed, paged_batch, monkeypatch, heads, kv_heads, block_size, head_dim, window, kv_dtype
):
    random.seed(seed)
    batch = paged_batch(
        _extend_chunks(block_size), heads, kv_heads, head_dim, block_size, torch.float32, kv_dtype
    )
    scale = 0.3
    _check(_native(batch, scale, window), _reference(batch, scale, window, monkeypatch), seed)


def test_queries_may_be_a_strided_view(seed, paged_batch, monkeypatch):
    """The model hands in q as a view into the fused qkv projection (rows strided)."""
    random.seed(seed)
    batch = paged_batch([*_extend_chunks(16), (40, 1)], 9, 3, 64, 16, torch.float32)
    t = batch.q.shape[0]
    qkv = torch.randn(t, 9 * 64 + 2 * 3 * 64)
    qkv[:, : 9 * 64] = batch.q.reshape(t, -1)
    batch.q = qkv[:, : 9 * 64].view(t, 9, 64)
    assert not batch.q.is_contiguous()
    _check(_native(batch, 0.125, None), _reference(batch, 0.125, None, monkeypatch), seed)


def test_kernels_write_every_row(seed, paged_batch, monkeypatch):
    """Called directly on a NaN-filled output: decode rows and chunk rows interleaved, each
    kernel writes its own rows and nothing else is left unwritten."""
    random.seed(seed)
    chunks = [(30, 1), (0, 17), (5, 1), (40, 9), (100, 1)]
    batch = paged_batch(chunks, 6, 2, 64, 16, torch.float32)
    ref = _reference(batch, 0.2, None, monkeypatch)
    plan = torch_ops._native_plan(batch.meta)
    ops = cpu_native.native_ops()
    out = torch.full_like(batch.q, float("nan"))
    d, e = plan["decode"], plan["extend"]
    ops.paged_decode(
        out, batch.q, batch.cache.k, batch.cache.v, d["tables"], d["lens"], d["starts"], 0.2, 0
    )
    decode_rows = d["starts"].long()
    assert not out[decode_rows].isnan().any()
    assert out.isnan().flatten(1).all(1).sum() == batch.q.shape[0] - len(decode_rows)
    ops.paged_extend(
        out,
        batch.q,
        batch.cache.k,
        batch.cache.v,
        e["tables"],
        e["lens"],
        e["starts"],
        e["qlens"],
        0.2,
        0,
    )
    _check(out, ref, seed)


def test_only_float32_queries_over_float32_or_bfloat16_caches_go_native(paged_batch):
    batch = paged_batch([(10, 1)], 4, 2, 16, 8, torch.float32, kv_dtype=torch.int8)
    assert batch.cache.quantized and torch_ops._native_ops(batch.q, batch.cache) is None
    batch = paged_batch([(10, 1)], 4, 2, 16, 8, torch.float16)
    assert torch_ops._native_ops(batch.q, batch.cache) is None
    batch = paged_batch([(10, 1)], 4, 2, 16, 8, torch.bfloat16)  # bfloat16 queries: twin
    assert torch_ops._native_ops(batch.q, batch.cache) is None
    batch = paged_batch([(10, 1)], 4, 2, 16, 8, torch.float32, kv_dtype=torch.bfloat16)
    assert torch_ops._native_ops(batch.q, batch.cache) is not None


def test_caches_of_two_dtypes_are_refused(paged_batch):
    batch = paged_batch([(10, 1)], 4, 2, 64, 8, torch.float32)
    plan = torch_ops._native_plan(batch.meta)["decode"]
    out = torch.empty_like(batch.q)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        cpu_native.native_ops().paged_decode(
            out,
            batch.q,
            batch.cache.k,
            batch.cache.v.bfloat16(),
            plan["tables"],
            plan["lens"],
            plan["starts"],
            0.2,
            0,
        )


@pytest.fixture
def amx_extend():
    """The AMX extend kernel, on machines that have it (skipped elsewhere: an AVX2 or AVX-512
    machine without AMX-BF16 compiles it out), switched back to its setting afterwards."""
    ops = cpu_native.native_ops()
    if not ops.amx_extend_available():
        pytest.skip("no AMX-BF16 here (or the OS refused the tile registers)")
    saved = ops.set_extend_amx(True)
    yield ops
    ops.set_extend_amx(saved)


def test_amx_extend_is_available_wherever_the_cpu_has_it():
    """A machine with AMX-BF16 must get the kernel: a build or permission failure would
    otherwise fall back silently to the 2-4x slower float32 kernel."""
    flags = cpu_native.cpu_flags().split()
    if "amx_bf16" not in flags or "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AMX-BF16")
    assert cpu_native.native_ops().amx_extend_available()


@pytest.mark.parametrize(("heads", "kv_heads"), GROUPS)
@pytest.mark.parametrize(("block_size", "head_dim"), [(16, 64), (1, 64), (32, 128)])
@pytest.mark.parametrize("window", [None, 1, 300])
def test_amx_extend_matches_twin_over_several_key_chunks(
    seed,
    paged_batch,
    monkeypatch,
    more_threads,
    amx_extend,
    heads,
    kv_heads,
    block_size,
    head_dim,
    window,
):
    """Chunks longer than the kernel's 256-key softmax pass (the running max and sum carried
    across passes), prefixes that do not start a 32-key group, windows that cut a group; the
    queries and probabilities split into bfloat16 parts keep float32-level agreement."""
    random.seed(seed)
    chunks = [
        (random.randrange(0, 40), random.randrange(300, 700)),
        (random.randrange(250, 600), random.randrange(2, 70)),
        (0, random.randrange(2, 33)),
    ]
    batch = paged_batch(
        chunks, heads, kv_heads, head_dim, block_size, torch.float32, torch.bfloat16
    )
    scale = head_dim**-0.5
    out = _native(batch, scale, window)
    _check(out, _reference(batch, scale, window, monkeypatch), seed)
    amx_extend.set_extend_amx(False)
    float32_kernel = _native(batch, scale, window)
    if window != 1:  # (a window of 1 copies V exactly either way)
        # Different arithmetic, so not the same bits: the AMX path is what ran above.
        assert not torch.equal(out, float32_kernel)


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
    reason="checks x86 machine code with objdump",
)
def test_decode_kernel_binary_keeps_its_prefetches():
    """The decode kernel's software prefetch is in the built binary. GCC's vectoriser once
    deleted every ``__builtin_prefetch`` of it silently (the kernel still passed every
    numerical test, 1.3x slower on scattered blocks); the inline-asm prefetch must survive."""
    binary = cpu_native.native_ops().__file__
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True
    ).stdout
    assert "prefetcht1" in code, f"no prefetcht1 in {binary}: the decode prefetch was compiled away"
