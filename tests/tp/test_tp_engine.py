"""Tensor parallelism through Ray: greedy output equal to one rank, per-rank memory, and
failures (a killed worker, a hung worker, a killed driver) that end in bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import ray
from kvmesh_testing import random_prompts

from kvmesh import LLM, SamplingParams
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.tp.tp_engine import TPEngine, TPWorkerError

pytestmark = pytest.mark.usefixtures("ray_local")

# Chunked prefill with a tiny budget, the prefix cache, and a pool small enough to preempt.
ENGINE = dict(block_size=4, max_num_batched_tokens=8, enable_prefix_caching=True)


def shared_prefix_prompts(vocab: int) -> list[list[int]]:
    prefixes = random_prompts(1, [13, 22], vocab)
    suffixes = random_prompts(2, [3, 9, 5, 1], vocab)
    return [prefixes[i % 2] + s for i, s in enumerate(suffixes)] + random_prompts(3, [17], vocab)


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_greedy_equals_tp1(tp_model, assert_all_blocks_free):
    """Token-identical greedy output with 4, 2 and 1 (replicated) KV heads, prefix caching,
    chunked prefill and preemption; each rank holds about half the parameters."""
    path, cfg = tp_model
    prompts = shared_prefix_prompts(cfg.vocab_size)
    one = LLM(str(path), num_kv_blocks=18, **ENGINE)
    two = LLM(str(path), num_kv_blocks=18, tensor_parallel_size=2, **ENGINE)
    try:
        assert isinstance(two.engine, TPEngine)
        # Twice: the second round reads the first round's prompts from the prefix cache.
        for _ in range(2):
            assert generate(two, prompts) == generate(one, prompts)
        stats = two.stats()
        assert stats["prefix_cache_hits"] > 0
        assert stats["num_preemptions"] > 0
        assert stats == one.stats()  # same scheduling decisions, step for step
        assert_all_blocks_free(two)

        full = sum(p.numel() * 4 for p in one.engine.model.parameters())
        ranks = two.engine.rank_param_bytes
        assert len(ranks) == 2 and ranks[0] == ranks[1]
        assert 0.45 * full < ranks[1] < 0.6 * full, (ranks, full)
        assert two.engine.is_healthy()
    finally:
        two.engine.shutdown()


def _long_generate(llm: LLM) -> None:
    prompts = random_prompts(5, [30, 31, 32, 33])
    generate(llm, prompts, max_tokens=400)


def _assert_fails_fast(llm: LLM, act, within_s: float, match: str) -> TPWorkerError:
    """Start a long generation, ``act()`` once it is a few steps in, and expect a
    TPWorkerError within ``within_s`` of that."""
    acted_at: list[float] = []

    def act_mid_generation() -> None:
        start_steps = llm.engine.num_steps
        while llm.engine.num_steps < start_steps + 3:
            time.sleep(0.001)
        acted_at.append(time.monotonic())
        act()

    thread = threading.Thread(target=act_mid_generation, daemon=True)
    thread.start()
    with pytest.raises(TPWorkerError, match=match) as info:
        _long_generate(llm)
    thread.join(timeout=5)
    assert acted_at, "the generation ended before the failure was injected"
    assert time.monotonic() - acted_at[0] < within_s
    return info.value


def test_killed_worker_ends_requests_with_a_clear_error(make_tiny_model, assert_all_blocks_free):
    path = make_tiny_model("llama", num_key_value_heads=2)
    llm = LLM(str(path), block_size=4, max_model_len=512, tensor_parallel_size=2)
    engine = llm.engine
    try:
        worker = engine.workers.actors[0]
        err = _assert_fails_fast(
            llm, lambda: ray.kill(worker), within_s=20, match=r"rank 1 \(pid \d+ .*\) ended"
        )
        assert engine.error is err and not engine.is_healthy()
        with pytest.raises(TPWorkerError):
            engine.check_health()
        with pytest.raises(TPWorkerError):  # the replica stays failed
            generate(llm, [[5, 6, 7]])
        assert_all_blocks_free(llm)  # the aborted requests gave their blocks back
    finally:
        engine.shutdown()


def test_worker_error_is_reported_at_once(make_tiny_model):
    """A worker whose loop raises exits, so rank 0 fails at once (not at the collective
    timeout), and the error names the worker's own exception."""
    path = make_tiny_model("llama", num_key_value_heads=2)
    llm = LLM(str(path), block_size=4, max_model_len=512, tensor_parallel_size=2)
    engine = llm.engine
    try:
        buf = engine.runner.sender.buffer
        buf[0] = 99  # a control message no worker knows
        engine.group.broadcast_ctrl(buf)
        start = time.monotonic()
        with pytest.raises(TPWorkerError, match="unknown tensor-parallel control message 99"):
            generate(llm, [[5, 6, 7]])
        assert time.monotonic() - start < 10 < engine.collective_timeout_s
    finally:
        engine.shutdown()


def test_hung_worker_times_out(make_tiny_model, assert_all_blocks_free):
    path = make_tiny_model("llama", num_key_value_heads=2)
    engine = TPEngine(
        EngineArgs(model=str(path), block_size=4, max_model_len=512, tensor_parallel_size=2),
        collective_timeout_s=2,
    )
    llm = LLM.__new__(LLM)
    llm.engine = engine
    pid = engine.workers.infos[0]["pid"]
    try:
        _assert_fails_fast(
            llm,
            lambda: os.kill(pid, signal.SIGSTOP),
            within_s=15,
            match=r"rank 1 .* did not answer a ping",
        )
        assert not engine.is_healthy()
        assert_all_blocks_free(llm)
    finally:
        os.kill(pid, signal.SIGKILL)
        engine.shutdown()


DRIVER = textwrap.dedent(
    """
    import sys, time
    from kvmesh import LLM
    llm = LLM(sys.argv[1], block_size=4, max_model_len=512, tensor_parallel_size=2)
    print("WORKER", llm.engine.workers.infos[0]["pid"], flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(") ")[1][0] != "Z"


def test_workers_die_with_their_driver(make_tiny_model):
    """Kill -9 the engine's process: Ray reaps its workers (no orphans)."""
    path = make_tiny_model("llama", num_key_value_heads=2)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line
        pid = int(line.split()[1])
        assert _alive(pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the worker outlived its driver"


@ray.remote(num_cpus=1)
class _Replica:
    """Stands in for a Ray Serve replica: an actor in bundle 0 of its placement group."""

    def __init__(self, path: str) -> None:
        self.engine = TPEngine(EngineArgs(model=path, block_size=4, tensor_parallel_size=2))

    def generate(self, prompt: list[int]) -> dict:
        engine = self.engine
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        engine.add_request(None, params, prompt_token_ids=prompt)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        return {
            "tokens": outs[-1].outputs[0].token_ids,
            "pg": engine.workers.pg.id.hex(),
            "owns_pg": engine.workers.owns_pg,
            "worker_pid": engine.workers.infos[0]["pid"],
        }


def test_inside_a_replica_actor_workers_use_its_placement_group(make_tiny_model):
    """How Serve runs it: the replica holds bundle 0, its worker takes bundle 1 of the same
    group, and the worker dies with the replica."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from kvmesh.replicas.tp.ray_workers import tp_bundles

    path = make_tiny_model("llama", num_key_value_heads=1)
    prompt = [5, 6, 7, 8, 9]
    want = generate(LLM(str(path), block_size=4), [prompt], max_tokens=6)[0]
    pg = placement_group(tp_bundles(2, use_gpu=False), strategy="STRICT_PACK")
    assert pg.wait(60)
    strategy = PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
    )
    replica = _Replica.options(scheduling_strategy=strategy).remote(str(path))
    try:
        got = ray.get(replica.generate.remote(prompt), timeout=120)
        assert got["tokens"] == want
        assert got["pg"] == pg.id.hex() and not got["owns_pg"]
    finally:
        ray.kill(replica)
        remove_placement_group(pg)
    deadline = time.monotonic() + 30
    while _alive(got["worker_pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(got["worker_pid"]), "the worker outlived its replica"


def test_tp2_structured_output_equals_tp1(make_tiny_model, smollm2_dir, assert_all_blocks_free):
    """Grammars live with rank 0 (it schedules and samples): constrained greedy output under
    tensor parallelism is the single-process output, token for token, and follows the
    grammar."""
    import json

    from kvmesh.replicas.structured import StructuredOutputsParams

    path = make_tiny_model("llama", vocab_size=49152, num_key_value_heads=2)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    specs = [
        StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        StructuredOutputsParams(regex=r"[a-c]{2}-\d{3}"),
        None,
    ]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=s) for s in specs]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(7, [9, 14, 11])]
    args = dict(num_kv_blocks=64, tokenizer=str(smollm2_dir), **ENGINE)
    one = LLM(str(path), **args)
    two = LLM(str(path), tensor_parallel_size=2, **args)
    try:
        a, b = one.generate(prompts, params), two.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
        assert json.loads(b[0].outputs[0].text).keys() == {"ok", "n"}
        assert b[1].outputs[0].finish_reason == "stop"
        assert_all_blocks_free(two)
    finally:
        two.engine.shutdown()
