"""Start-up: the warm-up leaves an engine as it found it, and the CPU kernel is built once per
machine (a later process, or one of several starting together, loads it without compiling)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kvmesh_testing import random_prompts

from kvmesh import LLM, SamplingParams
from kvmesh.kernels import cpu_native
from kvmesh.replicas.async_engine import AsyncLLM
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.warmup import warm_up

ENGINE = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=32)


def _clean_state(engine: LLMEngine) -> dict:
    """Everything a warm-up could leave behind, in comparable form."""
    pool = engine.kv.pool
    return {
        "stats": engine.stats(),
        "requests": dict(engine.requests),
        "cached": engine.kv.cached_block_hashes(),
        "events": engine.drain_kv_events(),
        "free_order": list(pool._free),
        "ref_counts": [b.ref_count for b in pool.blocks],
        "rng": engine._rng.get_state().tolist(),
    }


@pytest.mark.parametrize(
    "arch, overrides",
    [("llama", {}), ("mistral", {"sliding_window": 8})],  # sliding window frees blocks early
)
def test_warm_up_leaves_the_engine_as_new(make_tiny_model, arch, overrides):
    path = make_tiny_model(arch, num_hidden_layers=1, **overrides)
    fresh = LLMEngine(model=str(path), **ENGINE)
    warmed = LLMEngine(model=str(path), **ENGINE)
    for engine in (fresh, warmed):
        engine.enable_kv_events()  # a consumer (the cache reporter) hears nothing of it
    phases = warm_up(warmed)
    assert set(phases) == {"kernels", "warmup"} and all(s >= 0 for s in phases.values())
    assert {"model_files", "load_weights", "kv_cache", "kernels", "warmup"} <= set(
        warmed.startup_phases
    )
    state = _clean_state(warmed)
    assert state == _clean_state(fresh)
    assert state["stats"]["num_steps"] == 0 and state["stats"]["generation_tokens"] == 0
    assert state["stats"]["kv_blocks_free"] == state["stats"]["kv_blocks_total"]
    assert state["stats"]["prefix_cache_queries"] == 0 and not state["cached"]
    warmed.kv.pool.check_invariants()
    assert warm_up(warmed) == {}  # once is enough


def test_outputs_after_warm_up_match_an_engine_without_it(make_tiny_model):
    """Greedy and seedless sampled requests, prefix hits and chunked prefill: the same tokens
    and the same counters as an engine that never warmed up."""
    path = make_tiny_model("llama", num_hidden_layers=1)
    prompts = random_prompts(3, [20, 7, 33, 12])
    prompts += [prompts[0][:16] + p for p in random_prompts(4, [5, 9])]  # prefix hits
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)  # engine's own RNG
    ] * 3
    plain, warmed = LLM(str(path), **ENGINE), LLM(str(path), **ENGINE)
    warm_up(warmed.engine)
    results = []
    for llm in (plain, warmed):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results.append(([o.outputs[0].token_ids for o in outs], llm.stats()))
    assert results[0] == results[1]
    assert results[1][1]["prefix_cache_hits"] > 0


def test_warm_up_leaves_an_engine_in_use_alone(make_tiny_model):
    engine = LLMEngine(model=str(make_tiny_model("llama", num_hidden_layers=1)), **ENGINE)
    engine.add_request(None, SamplingParams(max_tokens=2), "busy", prompt_token_ids=[5, 6, 7])
    assert warm_up(engine) == {}
    assert list(engine.requests) == ["busy"] and engine.stats()["num_steps"] == 0


def test_async_llm_warms_up_before_serving_unless_told_not_to(make_tiny_model):
    path = str(make_tiny_model("llama", num_hidden_layers=1))
    warmed = AsyncLLM(model=path, **ENGINE)
    cold = AsyncLLM(model=path, warmup=False, **ENGINE)
    try:
        assert {"kernels", "warmup"} <= set(warmed.engine.startup_phases)
        assert "warmup" not in cold.engine.startup_phases
        assert warmed.stats() == cold.stats()  # nothing of the warm-up shows
    finally:
        for llm in (warmed, cold):
            asyncio.run(llm.shutdown(timeout_s=1))


def test_the_engine_thread_builds_and_warms_up_and_a_failed_start_fails_the_constructor(
    make_tiny_model, monkeypatch
):
    """One thread loads, warms and runs the engine (one OpenMP team: see AsyncLLM), and
    whatever start-up raises there is raised by the constructor."""
    from kvmesh.replicas import async_engine

    path = str(make_tiny_model("llama", num_hidden_layers=1))
    threads = []

    def spy_build(args):
        threads.append(("build", threading.current_thread().name))
        return async_engine.LLMEngine(args)

    def spy(engine):
        threads.append(("warm_up", threading.current_thread().name))
        return warm_up(engine)

    monkeypatch.setattr(async_engine, "build_engine", spy_build)
    monkeypatch.setattr(async_engine, "warm_up", spy)
    llm = AsyncLLM(model=path, **ENGINE)
    asyncio.run(llm.shutdown(timeout_s=1))
    # the thread that serves, not the constructor's
    assert threads == [("build", "kvmesh-engine"), ("warm_up", "kvmesh-engine")]

    with pytest.raises(ValueError, match="not a local directory"):
        AsyncLLM(model=path + "-missing", **ENGINE)

    def broken(engine):
        raise RuntimeError("device lost during warm-up")

    monkeypatch.setattr(async_engine, "warm_up", broken)
    with pytest.raises(RuntimeError, match="during warm-up"):
        AsyncLLM(model=path, **ENGINE)


def test_startup_phases_are_a_replica_metric(make_tiny_model):
    from prometheus_client.parser import text_string_to_metric_families

    from kvmesh.replicas.replica_metrics import ReplicaMetrics
    from kvmesh.router.ingress_metrics import merge_expositions

    engine = LLMEngine(model=str(make_tiny_model("llama", num_hidden_layers=1)), **ENGINE)
    warm_up(engine)
    texts = [
        ReplicaMetrics("m", "m#a", startup_phases=engine.startup_phases).render(engine.stats()),
        ReplicaMetrics("m", "m#b").render(engine.stats()),  # nothing to say: no series
    ]
    families = {f.name: f for f in text_string_to_metric_families(merge_expositions(texts))}
    samples = families["kvmesh:replica_startup_seconds"].samples
    assert {s.labels["replica"] for s in samples} == {"m#a"}
    assert {s.labels["model_name"] for s in samples} == {"m"}
    by_phase = {s.labels["phase"]: s.value for s in samples}
    assert by_phase == pytest.approx(engine.startup_phases)
    assert {"model_files", "load_weights", "kv_cache", "kernels", "warmup"} <= set(by_phase)


# ---- the kernel cache ---------------------------------------------------------------------------
def test_kernel_cache_key_names_the_binary_not_where_it_came_from(tmp_path, monkeypatch):
    """Two checkouts (or venvs) share a build; changed source, flags or CPU get their own."""
    inputs = cpu_native.build_inputs()
    text = json.dumps(inputs)
    assert str(cpu_native.SOURCE.parent) not in text and sys.prefix not in text
    assert inputs["cpu_flags"] and inputs["torch"] and inputs["python"]
    here = cpu_native.build_dir(inputs)
    copy = tmp_path / "elsewhere" / "paged_decode_cpu.cpp"
    copy.parent.mkdir()
    shutil.copyfile(cpu_native.SOURCE, copy)
    monkeypatch.setattr(cpu_native, "SOURCE", copy)
    assert cpu_native.build_dir() == here  # same bytes at another path: the same build
    copy.write_text(copy.read_text() + "\n// changed\n")
    assert cpu_native.build_dir() != here
    for key, value in [("cflags", ["-O2"]), ("cpu_flags", "sse2"), ("torch", "0.0")]:
        assert cpu_native.build_dir({**inputs, key: value}) != here


def test_kernel_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "STATUS", {})

    def no_compiler(build_directory):
        raise RuntimeError("no c++ here")

    monkeypatch.setattr(cpu_native, "_compile", no_compiler)
    assert cpu_native.native_ops.__wrapped__() is None
    assert cpu_native.STATUS["source"] == "unavailable"
    monkeypatch.setenv("KVMESH_CPU_NATIVE", "0")
    assert cpu_native.native_ops.__wrapped__() is None
    assert cpu_native.STATUS["source"] == "disabled"


@pytest.fixture(scope="module")
def built_kernel() -> Path:
    """The kernel built (or loaded) in this process's cache: a real module to copy around."""
    if cpu_native.native_ops() is None:
        pytest.skip("the CPU kernel cannot be built here")
    return Path(cpu_native.STATUS["path"])


# Runs in a fresh interpreter: torch's build entry points refuse, so loading the kernel from the
# cache is the only way to get it. With "fake", the compile step copies a built module instead
# (slowly), so several processes can race to build without a real 30-second compile.
_LOADER = """
import json, os, shutil, sys, time
import torch.utils.cpp_extension as ext

def refuse(*args, **kwargs):
    raise AssertionError("the cached kernel was rebuilt")

ext.load = ext._run_ninja_build = refuse
from kvmesh.kernels import cpu_native

def fake_compile(build_directory):
    time.sleep(1.5)
    lib = build_directory / (cpu_native.EXT_NAME + cpu_native.LIB_SUFFIX)
    shutil.copyfile(os.environ["KVMESH_TEST_PREBUILT"], lib)
    return cpu_native._import_extension(lib)

if sys.argv[1] == "fake":
    cpu_native._compile = fake_compile
module = cpu_native.native_ops()
print(json.dumps({**cpu_native.STATUS, "ok": hasattr(module, "paged_decode")}))
"""


def _loader(mode: str, cache: Path, prebuilt: Path) -> subprocess.Popen:
    env = {**os.environ, "KVMESH_CACHE": str(cache), "KVMESH_TEST_PREBUILT": str(prebuilt)}
    env.pop("KVMESH_CPU_NATIVE", None)
    return subprocess.Popen(
        [sys.executable, "-c", _LOADER, mode], env=env, stdout=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_a_later_process_loads_the_cached_kernel_without_compiling(built_kernel, tmp_path):
    cache = tmp_path / "cache"
    out = cache / "torch_extensions" / cpu_native.build_dir().name
    out.mkdir(parents=True)
    lib = out / built_kernel.name
    shutil.copyfile(built_kernel, lib)
    before = lib.stat().st_mtime_ns
    time.sleep(0.01)
    status = _result(_loader("real", cache, built_kernel))
    assert status["ok"] and status["source"] == "cache", status
    assert status["path"] == str(lib) and status["seconds"] < 5.0
    assert lib.stat().st_mtime_ns == before  # not rewritten
    assert sorted(p.name for p in out.iterdir()) == [lib.name]  # no build directory either


def test_replicas_starting_together_build_the_kernel_once(built_kernel, tmp_path):
    cache = tmp_path / "cache"  # empty
    procs = [_loader("fake", cache, built_kernel) for _ in range(3)]
    statuses = [_result(p) for p in procs]
    assert all(s["ok"] for s in statuses), statuses
    assert sorted(s["source"] for s in statuses) == ["built", "cache", "cache"], statuses
    out = cache / "torch_extensions" / cpu_native.build_dir().name
    assert {s["path"] for s in statuses} == {str(out / built_kernel.name)}
    # Published by a rename: no staging file or build directory is left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([built_kernel.name, "inputs.json"])
    assert json.loads((out / "inputs.json").read_text())["cpu_flags"]
