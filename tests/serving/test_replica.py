"""The replica deployment's class, in-process (no Ray): streaming, aborts, health, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmesh import SamplingParams
from kvmesh.replicas.async_engine import EngineDeadError
from kvmesh.replicas.deployment import LLMServer
from kvmesh.replicas.serve_messages import ReplicaRequest
from kvmesh.replicas.step_threads import StepThreads
from kvmesh.router.routing import CacheReporter

ENGINE = {"num_kv_blocks": 64, "max_model_len": 512, "block_size": 16, "max_num_seqs": 8}
PROMPT = list(range(10, 50))


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model(seed=3)


@pytest.fixture
async def make_server(tiny_dir):
    servers: list[LLMServer] = []

    def make(**options) -> LLMServer:
        server = LLMServer(
            {"model": str(tiny_dir), **ENGINE}, "tiny", options, cache_reporter=CacheReporter
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.shutdown(timeout_s=0)


def request(rid: str, max_tokens: int = 5, prompt=PROMPT, **params) -> ReplicaRequest:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    return ReplicaRequest(request_id=rid, model="tiny", prompt_token_ids=list(prompt), params=sp)


async def wait_all_free(server: LLMServer, timeout_s: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.stats()
        if stats["kv_blocks_free"] == stats["kv_blocks_total"] and not stats["num_in_flight"]:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks not all free after {timeout_s}s: {stats}")
        await asyncio.sleep(0.02)


async def test_stream_is_admitted_then_tokens_then_finish(make_server):
    server = make_server()
    chunks = [c async for c in server.generate(request("a", max_tokens=6))]
    assert chunks[0].admitted and chunks[0].error is None
    assert chunks[0].t_enqueued is not None and chunks[0].replica.startswith("tiny#")
    tokens = [t for c in chunks[1:] for t in c.delta_token_ids]
    assert len(tokens) == 6
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 6
    assert all(c.finish_reason is None for c in chunks[1:-1])
    await wait_all_free(server)


async def test_burst_threads_option_sizes_each_step(make_server):
    import torch

    before = torch.get_num_threads()
    try:
        server = make_server(torch_threads=1, torch_threads_burst=2, burst_min_tokens=8)
        assert server.engine.step_threads == StepThreads(base=1, burst=2, burst_min_tokens=8)
        chunks = [c async for c in server.generate(request("burst", max_tokens=4))]
        assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 4
        await wait_all_free(server)
        assert make_server().engine.step_threads is None  # not asked for: fixed threads
    finally:
        torch.set_num_threads(before)


async def test_leaving_the_stream_early_frees_kv_blocks(make_server):
    server = make_server()
    stream = server.generate(request("long", max_tokens=400))
    got = [await anext(stream) for _ in range(4)]  # admitted + 3 token chunks
    assert sum(len(c.delta_token_ids) for c in got) == 3
    assert server.stats()["kv_blocks_free"] < server.stats()["kv_blocks_total"]
    await stream.aclose()
    stats = await wait_all_free(server)
    assert stats["generation_tokens"] < 400  # it was stopped, not run to the end


async def test_bad_input_and_overload_come_back_as_error_chunks(make_server):
    server = make_server(max_pending_requests=1)
    bad = [c async for c in server.generate(request("bad", prompt=[10**7]))]
    assert len(bad) == 1 and bad[0].error.kind == "bad_request"
    assert "outside" in bad[0].error.message
    first = server.generate(request("one", max_tokens=300))
    assert (await anext(first)).admitted
    second = [c async for c in server.generate(request("two"))]
    assert second[0].error.kind == "overloaded"
    await first.aclose()
    await wait_all_free(server)


async def test_health_check_fails_once_the_engine_loop_dies(make_server):
    server = make_server()
    await server.check_health()

    def broken_step():
        raise RuntimeError("simulated kernel failure")

    server.engine.engine.step = broken_step
    chunks = [c async for c in server.generate(request("x"))]
    assert chunks[-1].error is not None and chunks[-1].error.kind == "engine_dead"
    with pytest.raises(EngineDeadError):
        await server.check_health()


async def test_graceful_shutdown_finishes_in_flight_and_refuses_new(make_server):
    server = make_server()
    stream = server.generate(request("inflight", max_tokens=40))
    assert (await anext(stream)).admitted
    shutdown = asyncio.ensure_future(server.shutdown(timeout_s=30))
    await asyncio.sleep(0)
    refused = [c async for c in server.generate(request("late"))]
    assert refused[0].error.kind == "shutting_down"
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "length"
    assert sum(len(c.delta_token_ids) for c in rest) == 40
    await shutdown


async def test_load_figures_for_router_and_autoscaler(make_server):
    server = make_server()
    routing = await server.record_routing_stats()
    for key in ("num_waiting", "num_running", "kv_cache_usage", "kv_blocks_free"):
        assert key in routing
    autoscaling = server.record_autoscaling_stats()
    assert autoscaling["kv_cache_usage"] == 0.0
    assert all(isinstance(v, float) for v in autoscaling.values())


async def test_a_long_step_does_not_hide_its_own_queue_from_the_autoscaler(make_server):
    """Requests added just before a long prefill step are reported while the step runs (the
    stats were taken after the previous step: a whole burst absorbed by one 20 s step on a
    CPU read as an idle replica, and the autoscaler removed the replica it had just added)."""
    server = make_server()
    engine = server.engine.engine
    execute = engine.runner.execute
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(inputs):
        loop.call_soon_threadsafe(entered.set)
        time.sleep(0.5)
        return execute(inputs)

    engine.runner.execute = slow
    first = asyncio.ensure_future(server.generate(request("slow", max_tokens=2)).__anext__())
    await asyncio.wait_for(entered.wait(), 5)
    during = server.record_autoscaling_stats()
    assert during["pending_prefill_tokens"] == len(PROMPT)  # the step computing it is running
    assert during["num_running"] + during["num_waiting"] == 1
    assert during["max_num_seqs"] == ENGINE["max_num_seqs"]
    await first
    engine.runner.execute = execute
    await server.engine.shutdown(timeout_s=5)


async def test_cache_report_for_the_prefix_aware_router(make_server):
    from kvmesh.router.routing import PAYLOAD_KEY, parse_report

    server = make_server(report_cache=True)
    req = request("cached", max_tokens=2)
    req.router_id, req.router_seq = "router-a", 7
    _ = [c async for c in server.generate(req)]
    stats = await server.record_routing_stats()
    report = parse_report(stats)
    assert PAYLOAD_KEY in stats and report is not None
    assert report.acks == {"router-a": 7}
    assert len(PROMPT) // 16 <= report.seq  # the prompt's full blocks were stored
