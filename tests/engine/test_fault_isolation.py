"""One request can never hurt another: numerical safety of the sampler over the whole accepted
parameter space, per-request fault isolation in the engine, and what ``AsyncLLM`` callers see
when the engine itself breaks, stalls or shuts down."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh import SamplingParams
from kvmesh.replicas.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
)
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.sampler import LOGPROB_FLOOR, SamplingRow, sample, sample_row

VOCAB = 320

# ---- the sampler over the accepted parameter space -------------------------------------------
# Exactly SamplingParams' accepted ranges (and the API's, which are narrower for temperature),
# with their edges and the values that used to overflow float32 given extra weight.
tiny_positive = st.sampled_from([1e-300, 1e-45, 1e-38, 1e-12, 1e-6, 1e-5])
temperatures = st.one_of(
    st.just(0.0), tiny_positive, st.floats(0.0, 100.0, allow_nan=False), st.just(100.0)
)
sampling_params = st.integers(1, 8).flatmap(
    lambda max_tokens: _sampling_params(max_tokens, st.integers(0, min(4, max_tokens)))
)


def _sampling_params(max_tokens: int, min_tokens) -> st.SearchStrategy[SamplingParams]:
    return st.builds(
        SamplingParams,
        max_tokens=st.just(max_tokens),
        min_tokens=min_tokens,
        temperature=temperatures,
        top_p=st.one_of(tiny_positive, st.floats(1e-9, 1.0), st.just(1.0)),
        top_k=st.one_of(st.just(-1), st.integers(1, VOCAB + 5)),
        min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.just(1.0)),
        presence_penalty=st.floats(-2.0, 2.0),
        frequency_penalty=st.floats(-2.0, 2.0),
        repetition_penalty=st.one_of(tiny_positive, st.floats(1e-9, 2.0), st.just(2.0)),
        seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        logprobs=st.one_of(st.none(), st.integers(0, 20)),
    )


@st.composite
def logit_rows(draw) -> torch.Tensor:
    """Rows a model may produce, and worse: huge, tiny, all equal, partly -inf or NaN."""
    kind = draw(st.sampled_from(["normal", "huge", "tiny", "equal", "masked", "nan", "inf"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    row = torch.randn(VOCAB, generator=gen)
    if kind == "huge":
        row = row * 3e38
    elif kind == "tiny":
        row = row * 1e-40
    elif kind == "equal":
        row = torch.full((VOCAB,), draw(st.sampled_from([0.0, -1e30, 1e30, 3.4e38])))
    elif kind in ("masked", "nan", "inf"):
        keep = draw(st.integers(1, VOCAB))
        fill = {"masked": float("-inf"), "nan": float("nan"), "inf": float("inf")}[kind]
        row[torch.randperm(VOCAB, generator=gen)[keep:]] = fill
    return row


def _request(params: SamplingParams, history: list[int]) -> SamplingRow:
    prompt = [5, 6, 7]
    req = SamplingRow("r", prompt, params)
    req.token_ids = prompt + history
    if not params.greedy:
        req.generator = torch.Generator().manual_seed(params.seed or 0)
    return req


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    params=sampling_params,
    row=logit_rows(),
    history=st.lists(st.integers(0, VOCAB - 1), max_size=6),
)
def test_sampler_never_makes_nan_or_inf_and_never_picks_a_masked_token(params, row, history):
    req = _request(params, history)
    result = sample_row(row, req, eos_token_ids=[2])
    selectable = ~torch.isnan(row) & (row != float("-inf"))
    if req.num_output_tokens < params.min_tokens:
        selectable[2] = False
    if not bool(selectable.any()):
        assert isinstance(result, ValueError)  # nothing to sample: that request alone fails
        return
    token, logprobs = result
    assert 0 <= token < VOCAB and bool(selectable[token]), (token, row[token])
    if params.logprobs is None:
        assert logprobs is None
    else:
        assert token in logprobs and len(logprobs) <= params.logprobs + 1
        assert all(math.isfinite(v) and LOGPROB_FLOOR <= v <= 0.0 for v in logprobs.values())


def test_batch_sampling_isolates_a_failing_row():
    rows = torch.randn(3, VOCAB)
    rows[1] = float("-inf")  # nothing selectable in row 1
    reqs = [_request(SamplingParams(temperature=0.7, seed=i), []) for i in range(3)]
    results = sample(rows, reqs, eos_token_ids=[2])
    assert isinstance(results[1], ValueError)
    alone = [
        sample_row(rows[i], _request(SamplingParams(temperature=0.7, seed=i), []), [2])
        for i in (0, 2)
    ]
    assert [results[0], results[2]] == alone


# ---- the engine: a fault in one request's processing fails that request alone -----------------
@pytest.fixture(scope="module")
def engine(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    # Small pool and token budget: random workloads chunk, evict and preempt.
    return LLMEngine(model=str(path), block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)


def run(engine: LLMEngine, work: list[tuple[str, list[int], SamplingParams]], aborts=()):
    """Run ``work`` to completion; ``aborts``: (step, request_id). Returns finished outputs."""
    for rid, prompt, params in work:
        engine.add_request(None, params, request_id=rid, prompt_token_ids=prompt)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for at, rid in aborts:
            if at == step and rid in engine.requests:
                done[rid] = engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 2000
    return done


def assert_all_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert not engine.requests and not engine.output_processor.states
    assert not engine.scheduler.running and not engine.scheduler.waiting


workloads = st.lists(
    st.tuples(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=30), sampling_params),
    min_size=2,
    max_size=6,
)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=workloads,
    victim=st.integers(0, 5),
    phase=st.sampled_from(["sample", "detokenize", "output", "cache_blocks"]),
    fault_at=st.integers(0, 5),
    abort=st.one_of(st.none(), st.tuples(st.integers(0, 8), st.integers(0, 5))),
)
def test_one_requests_fault_leaves_every_other_request_identical(
    engine, items, victim, phase, fault_at, abort
):
    """Random parameters, a random abort, and a fault injected into one request's processing:
    every other request finishes exactly as in a fault-free run, all blocks come back."""
    # Every request seeded (a fixed seed per request): outputs depend on nothing else.
    work = [(f"r{i}", prompt, _seeded(params, i)) for i, (prompt, params) in enumerate(items)]
    victim_id = f"r{victim % len(work)}"
    aborts = [] if abort is None else [(abort[0], f"r{abort[1] % len(work)}")]

    engine.fault_injector = None
    clean = run(engine, work, aborts)
    assert_all_free(engine)
    calls = {"n": 0}

    def injector(where: str, req) -> None:
        if req.request_id == victim_id and where == phase:
            calls["n"] += 1
            if calls["n"] > fault_at:
                raise RuntimeError("injected fault")

    engine.fault_injector = injector
    try:
        faulty = run(engine, work, aborts)
    finally:
        engine.fault_injector = None
    assert_all_free(engine)
    aborted = {rid for _, rid in aborts}  # aborted by step number: not comparable
    for rid, out in clean.items():
        if rid in aborted:
            continue
        if rid == victim_id and faulty[rid].error is not None:
            assert faulty[rid].outputs[0].finish_reason == "error"
            assert "injected" not in faulty[rid].error  # internals stay in the log
            continue
        got = faulty[rid].outputs[0]
        assert (got.token_ids, got.finish_reason) == (
            out.outputs[0].token_ids,
            out.outputs[0].finish_reason,
        ), rid


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    if params.seed is None:
        params.seed = 1000 + i
    return params


def test_the_request_that_stopped_a_replica_now_just_samples(engine):
    """temperature 1e-30 is inside the API's range [0, 2]; dividing logits by it overflowed to
    inf, softmax made NaN, multinomial raised inside the engine loop and the replica died."""
    hostile = [
        SamplingParams(temperature=1e-30, max_tokens=4, seed=1),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300, max_tokens=4, seed=2),
        SamplingParams(temperature=100.0, top_p=1e-300, min_p=1.0, max_tokens=4, logprobs=20),
    ]
    work = [(f"h{i}", [5, 6, 7, 8, 9], p) for i, p in enumerate(hostile)]
    outs = run(engine, work)
    for out in outs.values():
        assert out.error is None and len(out.outputs[0].token_ids) == 4
    assert_all_free(engine)


def test_a_failure_while_adding_leaves_no_trace(engine):
    engine.output_processor.tokenizer = object()  # the detokenizer cannot be built from it
    try:
        with pytest.raises(AttributeError):
            engine.add_request(None, SamplingParams(max_tokens=2), "x", prompt_token_ids=[5, 6])
    finally:
        engine.output_processor.tokenizer = None
    assert "x" not in engine.requests and not engine.scheduler.waiting
    assert_all_free(engine)


# ---- AsyncLLM: engine death, stalls, shutdown, admission control ------------------------------
async def _collect(llm: AsyncLLM, rid: str, prompt: list[int], params: SamplingParams):
    outs = []
    async for out in llm.generate(None, params, request_id=rid, prompt_token_ids=prompt):
        outs.append(out)
    return outs


def test_engine_failure_ends_every_stream_and_refuses_new_requests(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    llm = AsyncLLM(model=str(path), block_size=4, num_kv_blocks=64)
    real_execute = llm.engine.runner.execute
    calls = {"n": 0}

    def execute(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real_execute(inputs)

    llm.engine.runner.execute = execute

    async def main():
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        results = await asyncio.gather(
            *(_collect(llm, f"s{i}", [5, 6, 7 + i], params) for i in range(4)),
            return_exceptions=True,
        )
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "device lost" not in str(results[0])  # the cause stays in the log
        with pytest.raises(EngineDeadError):
            llm.check_health()
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            await _collect(llm, "late", [5, 6], params)
        assert time.monotonic() - t0 < 1.0  # refused at once, never left waiting

    asyncio.run(main())


def test_request_fault_reaches_only_its_caller(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    llm = AsyncLLM(model=str(path), block_size=4, num_kv_blocks=64)

    def injector(where: str, req) -> None:
        if req.request_id == "bad" and where == "sample" and req.num_output_tokens >= 2:
            raise KeyError("boom")

    llm.engine.fault_injector = injector

    async def main():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        good, bad = await asyncio.gather(
            _collect(llm, "good", [5, 6, 7], params),
            _collect(llm, "bad", [5, 6, 7], params),
            return_exceptions=True,
        )
        assert isinstance(bad, RequestFailedError) and "error id" in str(bad)
        assert len(good[-1].outputs[0].token_ids) == 8
        llm.check_health()  # the engine carries on
        await llm.shutdown(timeout_s=1)

    asyncio.run(main())
    assert llm.engine.stats()["kv_blocks_free"] == llm.engine.stats()["kv_blocks_total"]


def test_watchdog_reports_a_stalled_engine(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    llm = AsyncLLM(model=str(path), block_size=4, num_kv_blocks=64, watchdog_s=0.5)
    release = threading.Event()
    real_execute = llm.engine.runner.execute

    def execute(inputs):
        release.wait(10)  # a step that hangs (a stuck collective, a deadlocked kernel)
        return real_execute(inputs)

    llm.engine.runner.execute = execute

    async def main():
        task = asyncio.ensure_future(
            _collect(llm, "s", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
        )
        await asyncio.sleep(0.1)
        llm.check_health()  # within the bound: healthy
        await asyncio.sleep(0.7)
        with pytest.raises(EngineDeadError, match="stalled"):
            llm.check_health()
        # Shutdown ends the waiting stream with an error, without the stuck engine thread.
        shutdown = asyncio.ensure_future(llm.shutdown(timeout_s=0))
        with pytest.raises(EngineOverloadedError, match="shut down"):
            await asyncio.wait_for(task, 2)
        release.set()
        await shutdown

    asyncio.run(main())


def test_admission_sheds_requests_that_would_wait_too_long(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    llm = AsyncLLM(model=str(path), block_size=4, num_kv_blocks=256, max_queue_delay_s=5.0)

    async def main():
        # Measure a prefill rate first, then pretend a lot of prefill work is queued.
        await _collect(llm, "warm", list(range(3, 200)), SamplingParams(max_tokens=1))
        rate = llm._prefill_rate
        assert rate is not None and rate > 0
        llm._stats = {**llm._stats, "pending_prefill_tokens": int(rate * 10)}
        blocker = asyncio.ensure_future(
            _collect(llm, "long", [5] * 30, SamplingParams(max_tokens=200, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        llm._stats = {**llm._stats, "pending_prefill_tokens": int(rate * 10)}
        with pytest.raises(EngineOverloadedError, match="max_queue_delay_s"):
            await _collect(llm, "shed", [5, 6, 7], SamplingParams(max_tokens=1))
        # Decode steps slower than the inter-token budget: new requests wait elsewhere.
        llm._stats = {**llm._stats, "pending_prefill_tokens": 0}
        llm.max_inter_token_latency_s = 0.2
        llm._decode_step_s, llm._decode_batch = 10.0, 1.0
        with pytest.raises(EngineOverloadedError, match="max_inter_token_latency_s"):
            await _collect(llm, "shed2", [5, 6, 7], SamplingParams(max_tokens=1))
        blocker.cancel()
        await asyncio.gather(blocker, return_exceptions=True)
        await llm.shutdown(timeout_s=1)

    asyncio.run(main())


def test_random_parameters_never_kill_the_engine_loop(make_tiny_model):
    """Many concurrent requests with random accepted parameters through AsyncLLM."""
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    llm = AsyncLLM(model=str(path), block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)
    rng = random.Random(0)

    def params() -> SamplingParams:
        max_tokens = rng.randint(1, 6)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=rng.choice([0.0, 1e-30, 1e-6, 0.5, 2.0, 100.0]),
            top_p=rng.choice([1e-300, 0.1, 1.0]),
            top_k=rng.choice([-1, 1, 5, 1000]),
            min_p=rng.choice([0.0, 0.5, 1.0]),
            repetition_penalty=rng.choice([1e-300, 0.5, 1.0, 2.0]),
            presence_penalty=rng.uniform(-2, 2),
            frequency_penalty=rng.uniform(-2, 2),
            logprobs=rng.choice([None, 0, 20]),
            min_tokens=rng.randint(0, min(3, max_tokens)),
        )

    async def main():
        results = await asyncio.gather(
            *(
                _collect(
                    llm,
                    f"q{i}",
                    [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))],
                    params(),
                )
                for i in range(40)
            )
        )
        assert all(r[-1].finished and r[-1].error is None for r in results)
        llm.check_health()
        await llm.shutdown(timeout_s=1)

    asyncio.run(main())
    stats = llm.engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
