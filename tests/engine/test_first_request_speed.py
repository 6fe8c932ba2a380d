"""A freshly started replica serves its first requests at steady-state speed.

Each case starts a serving engine (``AsyncLLM``, as ``LLMServer`` builds it) in a fresh
interpreter over the embedded SmolLM2 and times requests one at a time (concurrency 1, as a
new user's load generator would): a 64-token prompt, 32 greedy output tokens. The first three
requests' time to first token and time per output token must be within 1.5x of the steady
state (median of the first three against the median of the next six), and the very first
request within 2.5x of it, with an empty kernel cache (the CPU kernel is compiled while the
replica starts) and with the cache that start left behind (loaded, not rebuilt).

Why a median and two bounds: on a shared 2-core runner one request in a few takes 1.5x its
neighbours for reasons of its own (the worst of three was 1.57x once with other jobs on the
cores). The stalls this test is for are far larger: without the warm-up the first request took
7x the steady TTFT and 47x its time per output token (the kernel compiled inside its first
decode step).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FIRST, STEADY = 3, 6
MAX_RATIO = 1.5
"""Median of the first requests against the steady median."""
MAX_FIRST_RATIO = 2.5
"""The very first request against the steady median."""

_REPLICA = """
import asyncio, json, sys, time
import torch
from kvmesh import SamplingParams
from kvmesh.kernels import cpu_native
from kvmesh.replicas.async_engine import AsyncLLM

start = time.perf_counter()
llm = AsyncLLM(model=sys.argv[1])
ready_s = time.perf_counter() - start
vocab = llm.engine.arch.vocab_size


async def one(i):
    # A different prompt each time: no request is served from another's prefix cache.
    prompt = [(500 + 7919 * i + 31 * j) % vocab for j in range(64)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    sent, first = time.perf_counter(), None
    async for out in llm.generate(None, params, request_id=f"r{i}", prompt_token_ids=prompt):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = len(out.outputs[0].token_ids)
    return {"ttft": first - sent, "tpot": (end - first) / (n - 1)}


async def main(n):
    try:
        return [await one(i) for i in range(n)]
    finally:
        await llm.shutdown()


requests = asyncio.run(main(int(sys.argv[2])))
print(json.dumps({
    "ready_s": ready_s,
    "phases": llm.engine.startup_phases,
    "kernel": cpu_native.STATUS,
    "threads": torch.get_num_threads(),
    "requests": requests,
}))
"""


def _start_replica(model_dir: Path, cache: Path) -> dict:
    env = {**os.environ, "KVMESH_CACHE": str(cache)}
    env.pop("KVMESH_CPU_NATIVE", None)
    proc = subprocess.run(
        [sys.executable, "-c", _REPLICA, str(model_dir), str(FIRST + STEADY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(case: str, run: dict) -> dict[str, float]:
    reqs = run["requests"]
    first, steady = reqs[:FIRST], reqs[FIRST:]
    ratios = {}
    print(f"\n{case} kernel cache: ready in {run['ready_s']:.1f}s, kernel {run['kernel']}")
    print("  start-up phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in run["phases"].items()))
    for key in ("ttft", "tpot"):
        base = statistics.median(r[key] for r in steady)
        ratios[key] = statistics.median(r[key] for r in first) / base
        ratios[f"{key} of the very first"] = first[0][key] / base
        print(
            f"  {key}: first {[round(r[key] * 1000, 1) for r in first]} ms, steady median "
            f"{base * 1000:.1f} ms (of {[round(r[key] * 1000, 1) for r in steady]}), "
            f"first-three median / steady = {ratios[key]:.2f}, "
            f"very first / steady = {ratios[f'{key} of the very first']:.2f}"
        )
    return ratios


def test_first_requests_run_at_steady_state_speed(smollm2_dir, tmp_path):
    cache = tmp_path / "kvmesh-cache"  # no kernel build in it yet
    empty = _start_replica(smollm2_dir, cache)
    built = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    warm = _start_replica(smollm2_dir, cache)
    ratios = {"empty": _report("empty", empty), "warm": _report("warm", warm)}

    if empty["kernel"].get("source") == "built":  # a compiler is here: the cache must serve
        lib = Path(empty["kernel"]["path"])
        assert warm["kernel"]["source"] == "cache", warm["kernel"]
        assert warm["kernel"]["path"] == str(lib)
        # Loaded as it was: nothing in the cache was rebuilt or rewritten.
        assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == built
        assert lib in built
    for case, by_metric in ratios.items():
        for metric, ratio in by_metric.items():
            bound = MAX_FIRST_RATIO if "very first" in metric else MAX_RATIO
            assert ratio <= bound, f"{case} cache: first-request {metric} is {ratio:.2f}x"
