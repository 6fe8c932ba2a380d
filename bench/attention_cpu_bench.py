"""Microbenchmark of CPU paged attention: the C++ kernels of ``kernels/cpu_native`` vs the torch
twin (SDPA over gathered K/V), on SmolLM2 shapes (9 query heads, 3 KV heads, head dim 64,
block 16), float32 queries over a float32 and a bfloat16 cache (the bfloat16 model's).

    flock /tmp/kvmesh-bench.lock .venv/bin/python bench/attention_cpu_bench.py [--quick] \
        [--kv-dtypes float32,bfloat16] [--layers 10]

Decode: one query token per sequence, batch 1/16/64 x context 128/512/2048; reports GB/s as
the bytes of K+V the step has to read (context x KV heads x head dim x element size x 2) over
the time of one call: the old two-pass kernel (built from git for the comparison only; float32
caches only), the new
one-pass kernel, and ``paged_attention`` through the new kernel and through the torch twin.

Decode as a model runs it (``decode_model``): ``--layers`` caches (default 10), one call per
layer in turn, for 64 x 512 and 16 x 2,048, with blocks scattered through the pool (as after a
while of serving) and in order (a fresh pool). One layer's cache alone is partly still in the
last-level cache on the next call; ten are not, as in a model's step.

Extend: one chunk of new tokens, fresh or over a cached prefix (a prefix-cache hit or a
chunked-prefill continuation), through ``paged_attention`` with the C++ kernel and with the
torch twin (SDPA); reports milliseconds per call. On a machine with AMX-BF16 a bfloat16 cache's
chunks go to the AMX kernel, and the float32-arithmetic kernel it replaces is timed beside it.
The metadata is the same for all, so the per-step plan is built once and reused, as it is
across a model's layers.

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvmesh.kernels import cpu_native, torch_ops
from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def make_batch(
    chunks: list[tuple[int, int]],
    kv_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scattered: bool = True,
):
    """Sequences of ``(cached, new)`` tokens with blocks scattered through a random pool
    (``scattered=False``: each sequence's blocks in order, as a fresh pool hands them out)."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-(c + n) // BLOCK) for c, n in chunks]
    num_blocks = sum(needed) + 1
    ids = torch.randperm(num_blocks - 1, generator=g) if scattered else torch.arange(num_blocks - 1)
    order = (ids + 1).tolist()
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    cache = KVCacheLayer(
        torch.randn(shape, generator=g).to(kv_dtype), torch.randn(shape, generator=g).to(kv_dtype)
    )
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    meta = AttentionMetadata.for_chunks(chunks, tables)
    q = torch.randn(sum(meta.query_lens_cpu), HEADS, HEAD_DIM, generator=g)
    return q, cache, meta


@contextlib.contextmanager
def native(enabled: bool):
    """Route ``paged_attention`` through the C++ kernels (True) or the torch twin (False)."""
    if hasattr(torch_ops, "USE_CPU_NATIVE"):
        saved = torch_ops.USE_CPU_NATIVE
        torch_ops.USE_CPU_NATIVE = enabled
        try:
            yield
        finally:
            torch_ops.USE_CPU_NATIVE = saved
    else:  # the code before the one-pass kernels: only the decode hook existed
        saved = torch_ops._native_decode
        if not enabled:
            torch_ops._native_decode = lambda q, cache: None
        try:
            yield
        finally:
            torch_ops._native_decode = saved


def seconds_per_call(fn, min_time: float) -> float:
    """Best of 5 rounds, each as many calls as fill ``min_time / 5`` seconds (the best, not
    the median: on a shared machine other jobs only ever add time)."""
    fn()  # warm: plan, allocator, thread pool
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_time / 5 / once))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps)
    return min(rounds)


OLD_COMMIT = "af4a405"
"""The last commit with the two-pass decode kernel (kernels/csrc/paged_decode_cpu.cpp)."""


def old_two_pass_kernel():
    """The two-pass decode kernel as it was at OLD_COMMIT, built once into the kvmesh cache
    (~45 s the first time) for this comparison only; None where git or a compiler is missing."""
    from torch.utils.cpp_extension import load

    repo = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:kernels/csrc/paged_decode_cpu.cpp"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    key = hashlib.sha256(src + json.dumps(cpu_native.build_inputs()).encode()).hexdigest()[:16]
    out = cpu_native.cache_root() / "torch_extensions" / f"bench_old_two_pass-{key}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "old_two_pass.cpp").write_bytes(src)
    bin_dir = str(Path(sys.executable).parent)  # ninja from the venv
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        return load(
            name="kvmesh_bench_old_two_pass",
            sources=[str(out / "old_two_pass.cpp")],
            extra_cflags=list(cpu_native.EXTRA_CFLAGS),
            extra_ldflags=list(cpu_native.EXTRA_LDFLAGS),
            build_directory=str(out),
        )
    except Exception as exc:  # a benchmark extra: report and go on
        print(f"old kernel unavailable: {exc}", file=sys.stderr)
        return None


def decode_row(b: int, ctx: int, min_time: float, old, kv_dtype: torch.dtype) -> dict:
    """One shape: the old two-pass kernel and the new one-pass kernel called directly on the
    same rows, and ``paged_attention`` through the new kernel and through the torch twin."""
    ops = cpu_native.native_ops()
    scale = HEAD_DIM**-0.5
    q, cache, meta = make_batch([(ctx - 1, 1)] * b, kv_dtype)
    kv_bytes = b * ctx * KV_HEADS * HEAD_DIM * cache.k.element_size() * 2
    row = {
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "batch": b,
        "context": ctx,
        "kv_mib": round(kv_bytes / 2**20, 2),
    }
    if kv_dtype != torch.float32:
        old = None  # the old kernel reads float32 only
    tables, lens = meta.block_tables, meta.seq_lens
    tokens = torch.arange(b, dtype=torch.int32)
    out = torch.empty_like(q)

    def attention(on: bool) -> None:
        with native(on):
            torch_ops.paged_attention(q, cache, meta, scale)

    calls = {
        "new_kernel": lambda: ops.paged_decode(
            out, q, cache.k, cache.v, tables, lens, tokens, scale, 0
        ),
        "paged_attention_native": lambda: attention(True),
        "paged_attention_torch_twin": lambda: attention(False),
    }
    if old is not None:
        calls["old_kernel"] = lambda: old.paged_decode(
            out, q, cache.k, cache.v, tables, lens, scale, 0
        )
    for name, fn in calls.items():
        s = seconds_per_call(fn, min_time)
        row[f"{name}_us"] = round(s * 1e6, 1)
        row[f"{name}_gbps"] = round(kv_bytes / s / 1e9, 2)
    if old is not None:
        row["new_vs_old"] = round(row["old_kernel_us"] / row["new_kernel_us"], 2)
    return row


def bench_decode(batches, contexts, min_time, old, kv_dtypes):
    return [
        decode_row(b, ctx, min_time, old, kv_dtype)
        for kv_dtype in kv_dtypes
        for b in batches
        for ctx in contexts
    ]


def decode_model_row(
    b: int, ctx: int, layers: int, kv_dtype: torch.dtype, scattered: bool, min_time: float
) -> dict:
    """Decode as a model runs it: one call per layer, each layer its own cache, so the K/V a
    call reads come from memory, not from the last-level cache (a single layer's 48 MiB is
    partly still there on the next call; ``layers`` x 48 MiB is not)."""
    ops = cpu_native.native_ops()
    batches = [
        make_batch([(ctx - 1, 1)] * b, kv_dtype, seed=i, scattered=scattered) for i in range(layers)
    ]
    tokens = torch.arange(b, dtype=torch.int32)
    outs = [torch.empty_like(q) for q, _, _ in batches]

    def model_step() -> None:
        for (q, cache, meta), out in zip(batches, outs, strict=True):
            ops.paged_decode(
                out, q, cache.k, cache.v, meta.block_tables, meta.seq_lens, tokens,
                HEAD_DIM**-0.5, 0,
            )  # fmt: skip

    per_call = seconds_per_call(model_step, min_time * layers / 4) / layers
    kv_bytes = b * ctx * KV_HEADS * HEAD_DIM * batches[0][1].k.element_size() * 2
    return {
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "batch": b,
        "context": ctx,
        "layers": layers,
        "blocks": "scattered" if scattered else "in order",
        "us_per_layer": round(per_call * 1e6, 1),
        "gbps": round(kv_bytes / per_call / 1e9, 2),
    }


def bench_decode_model(layers: int, min_time: float, kv_dtypes) -> list[dict]:
    return [
        decode_model_row(b, ctx, layers, kv_dtype, scattered, min_time)
        for kv_dtype in kv_dtypes
        for b, ctx in [(64, 512), (16, 2048)]
        for scattered in (True, False)
    ]


@contextlib.contextmanager
def extend_amx(enabled: bool):
    """Allow (True) or forbid (False) the AMX extend kernel for bfloat16 caches."""
    ops = cpu_native.native_ops()
    saved = ops.set_extend_amx(enabled)
    try:
        yield
    finally:
        ops.set_extend_amx(saved)


def bench_extend(cases, min_time, kv_dtypes):
    """``native`` is what the engine runs (for a bfloat16 cache on an AMX machine: the AMX
    kernel); there, ``native_float32_kernel`` is the float32-arithmetic kernel it replaces."""
    amx = cpu_native.native_ops().amx_extend_available()
    rows = []
    for kv_dtype, (cached, new) in ((d, c) for d in kv_dtypes for c in cases):
        q, cache, meta = make_batch([(cached, new)], kv_dtype)
        row = {"kv_dtype": str(kv_dtype).removeprefix("torch."), "cached": cached, "new": new}
        variants = [("native", True, True), ("torch_twin", False, True)]
        if amx and kv_dtype == torch.bfloat16:
            variants.append(("native_float32_kernel", True, False))
        for name, on, allow_amx in variants:
            with native(on), extend_amx(allow_amx):
                s = seconds_per_call(
                    lambda q=q, cache=cache, meta=meta: torch_ops.paged_attention(
                        q, cache, meta, HEAD_DIM**-0.5
                    ),
                    min_time,
                )
            row[f"{name}_ms"] = round(s * 1e3, 3)
        row["speedup"] = round(row["torch_twin_ms"] / row["native_ms"], 2)
        if "native_float32_kernel_ms" in row:
            ratio = row["native_float32_kernel_ms"] / row["native_ms"]
            row["amx_vs_float32_kernel"] = round(ratio, 2)
        rows.append(row)
    return rows


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--no-old", action="store_true", help="skip the old two-pass kernel")
    ap.add_argument("--kv-dtypes", default="float32,bfloat16", help="cache dtypes, comma-separated")
    ap.add_argument(
        "--layers",
        type=int,
        default=10,
        help="layers of the model-like decode case, each with its own cache (0: skip it)",
    )
    args = ap.parse_args()
    kv_dtypes = [getattr(torch, name) for name in args.kv_dtypes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_native.native_ops() is None:
        raise SystemExit(f"the C++ kernels are unavailable here: {cpu_native.STATUS}")
    min_time = 0.25 if args.quick else 1.0
    batches = [1, 16] if args.quick else [1, 16, 64]
    contexts = [128, 2048] if args.quick else [128, 512, 2048]
    extend = [(0, 256), (0, 2048), (512, 128), (1024, 512), (2000, 48)]
    old = None if args.no_old else old_two_pass_kernel()
    with torch.inference_mode():
        result = {
            "cpu": platform.processor() or platform.machine(),
            "cpu_flags": cpu_flags(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK},
            "old_kernel": f"{OLD_COMMIT}:kernels/csrc/paged_decode_cpu.cpp" if old else None,
            "decode": bench_decode(batches, contexts, min_time, old, kv_dtypes),
            "decode_model": bench_decode_model(args.layers, min_time, kv_dtypes)
            if args.layers
            else [],
            "extend": bench_extend(extend[1:] if args.quick else extend, min_time, kv_dtypes),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
