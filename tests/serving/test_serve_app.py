"""The served app end to end: real Ray Serve, real HTTP, the real ``openai`` client.

Every test shares the session's one app (``conftest.serve_app``): two tiny models, ``tiny``
with two replicas and ``tiny-b`` with one (and a 2-request engine queue), an alias
``tiny-canary`` splitting 90/10 between them, API keys, the response cache and the test-only
crash hook. The replica-crash test runs last in this module and waits for recovery.
"""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmesh import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def oai(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key=serve_app.api_key, timeout=60)


@pytest.fixture(scope="module")
def offline(serve_app) -> LLM:
    """The same weights in the offline engine, in this process."""
    return LLM(str(serve_app.model_dirs[0]), **serve_app.engine_args)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


# ---- the openai client ---------------------------------------------------------------------
def test_completions_match_offline_engine(oai, offline):
    for prompt in PROMPTS:
        want = offline.generate(prompt, greedy(12))[0]
        got = oai.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.model == "tiny"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason

        stream = oai.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == want.outputs[0].text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
            want.outputs[0].token_ids
        )
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_matches_offline_engine(oai, offline):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
    ]
    want = offline.chat(messages, greedy(10))[0]
    got = oai.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=10, temperature=0
    )
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    stream = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.outputs[0].text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [want.outputs[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)


def test_logprobs_and_token_id_prompts(oai, offline):
    ids = offline.tokenizer.encode(PROMPTS[0])
    want = offline.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)
    )[0]
    got = oai.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) <= 2 for top in lp.top_logprobs)
    for mine, theirs, token in zip(
        lp.token_logprobs, want.outputs[0].logprobs, want.outputs[0].token_ids, strict=True
    ):
        assert mine == pytest.approx(theirs[token], abs=1e-4)
    chat = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


def test_two_replicas_both_serve_and_are_named(serve_app):
    """Waves of four concurrent requests: the router spreads load, so both replicas answer
    (one at a time, a cold tie may fall on one replica for a while: routing is by load)."""

    async def wave(c: httpx.AsyncClient, first: int) -> list[httpx.Response]:
        bodies = [
            {"model": "tiny", "prompt": f"request number {i}", "max_tokens": 8, "ignore_eos": True}
            for i in range(first, first + 4)
        ]
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    async def main() -> collections.Counter:
        seen = collections.Counter()
        headers = {"Authorization": f"Bearer {serve_app.api_key}"}
        async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=60) as c:
            for first in range(0, 16, 4):
                for r in await wave(c, first):
                    assert r.status_code == 200, r.text
                    assert r.headers["x-kvmesh-model-version"] == "tiny"
                    seen[r.headers["x-kvmesh-replica"]] += 1
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 2 and all(name.startswith("tiny#") for name in seen), seen


def reported_prefix_hits(serve_app, model: str) -> dict[str, float]:
    return {s["replica"]: s["stats"]["prefix_cache_hits"] for s in serve_app.replicas(model)}


def test_prefix_aware_router_keeps_a_prefix_on_one_replica(serve_app):
    """``tiny`` runs kvmesh's router: a repeated long prefix hits one replica's cache, and
    that replica's own prefix-hit counter rises by what the requests reused."""
    prefix = list(range(1000, 1064))  # four full blocks
    hits_before = reported_prefix_hits(serve_app, "tiny")
    served, cached = [], []
    with serve_app.client() as c:
        for i in range(6):
            r = c.post(CMPL, json={"model": "tiny", "prompt": [*prefix, 2000 + i], "max_tokens": 1})
            assert r.status_code == 200, r.text
            served.append(r.headers["x-kvmesh-replica"])
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(set(served)) == 1, served
    assert cached[0] == 0 and all(n == 64 for n in cached[1:]), cached
    home = served[0]
    deadline = time.monotonic() + 10  # replicas push their stats every 0.2 s
    while True:
        gained = reported_prefix_hits(serve_app, "tiny")[home] - hits_before.get(home, 0)
        if gained >= 5 * 64 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gained >= 5 * 64, gained
    # The router's decisions are on the app's /metrics: at least the five hits just made.
    with serve_app.client() as c:
        text = c.get("/metrics").text
    decisions = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "kvmesh:router_decisions"
        for s in family.samples
        if s.name.endswith("_total") and s.labels.get("model_name") == "tiny"
    }
    assert decisions.get("cache_hit", 0) >= 5, decisions


async def test_prefix_aware_router_spills_when_the_prefix_replica_is_flooded(serve_app):
    """A burst sharing one cached prefix: the replica holding it takes the first requests,
    and once the work queued there outweighs recomputing the prefix, the rest go to the
    other replica (the cost model's load terms, not a fallback after failures)."""
    prefix = list(range(5000, 5064))
    headers = {"Authorization": f"Bearer {serve_app.api_key}"}
    async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=120) as c:
        r = await c.post(CMPL, json={"model": "tiny", "prompt": [*prefix, 1], "max_tokens": 1})
        assert r.status_code == 200, r.text
        home = r.headers["x-kvmesh-replica"]

        async def flood(i: int) -> tuple[str, int]:
            body = {
                "model": "tiny",
                "prompt": [*prefix, 6000 + i],
                "max_tokens": 256,
                "ignore_eos": True,
            }
            r = await c.post(CMPL, json=body)
            assert r.status_code == 200, r.text
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            return r.headers["x-kvmesh-replica"], cached

        results = await asyncio.gather(*(flood(i) for i in range(24)))
    where = collections.Counter(replica for replica, _ in results)
    assert len(where) == 2, where  # it spilled
    other = next(name for name in where if name != home)
    assert where[home] > where[other], where  # but locality still won the first requests
    # Requests on the home replica reused the prefix.
    assert all(cached == 64 for replica, cached in results if replica == home), results


def test_batch_prompts_give_one_choice_each(serve_app, offline):
    with serve_app.client() as c:
        r = c.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": PROMPTS,
                "max_tokens": 5,
                "temperature": 0,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    want = offline.generate(PROMPTS, greedy(5))
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert [ch["text"] for ch in body["choices"]] == [w.outputs[0].text for w in want]
    assert body["usage"]["prompt_tokens"] == sum(len(w.prompt_token_ids) for w in want)


# ---- bad input -----------------------------------------------------------------------------
GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
BAD_CASES = [
    # (path, json body or raw bytes, headers, status, error type, param)
    (CMPL, b"{not json", None, 400, "invalid_request_error", None),
    (CMPL, {**GOOD, "frobnicate": 1}, None, 400, "invalid_request_error", "frobnicate"),
    (CMPL, {**GOOD, "max_tokens": "5"}, None, 400, "invalid_request_error", "max_tokens"),
    (CMPL, {**GOOD, "max_tokens": 0}, None, 400, "invalid_request_error", "max_tokens"),
    (CMPL, {**GOOD, "temperature": 3}, None, 400, "invalid_request_error", "temperature"),
    (CMPL, {**GOOD, "n": 2}, None, 400, "invalid_request_error", "n"),
    (CMPL, {**GOOD, "stop": 7}, None, 400, "invalid_request_error", "stop"),
    (CMPL, {**GOOD, "prompt": []}, None, 400, "invalid_request_error", "prompt"),
    (CMPL, {**GOOD, "prompt": [1, 10**9]}, None, 400, "invalid_request_error", "prompt"),
    (CMPL, {**GOOD, "stream": "yes"}, None, 400, "invalid_request_error", "stream"),
    (
        CMPL,
        {**GOOD, "stream_options": {"include_usage": True}},
        None,
        400,
        "invalid_request_error",
        "stream_options",
    ),
    (CHAT, {"model": "tiny", "messages": []}, None, 400, "invalid_request_error", "messages"),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "function", "content": "x"}]},
        None,
        400,
        "invalid_request_error",
        "messages[0].role",
    ),
    (
        CHAT,
        {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        },
        None,
        400,
        "invalid_request_error",
        "messages[0].content[0].type",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        None,
        400,
        "invalid_request_error",
        "top_logprobs",
    ),
    (CMPL, GOOD, {"Authorization": ""}, 401, "authentication_error", None),
    (CMPL, GOOD, {"Authorization": "Bearer wrong-key"}, 401, "authentication_error", None),
    (CMPL, {**GOOD, "model": "gpt-17"}, None, 404, "not_found_error", "model"),
    (CMPL, {**GOOD, "prompt": [5] * 5000}, None, 413, "request_too_large", "prompt"),
    (CMPL, {**GOOD, "prompt": "x" * (1 << 20)}, None, 413, "request_too_large", None),
    ("/v1/nothing-here", GOOD, None, 404, "not_found_error", None),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "etype", "param"),
    BAD_CASES,
    ids=[f"{c[3]}-{i}" for i, c in enumerate(BAD_CASES)],
)
def test_bad_input_gets_status_and_error_body(serve_app, path, body, headers, status, etype, param):
    with serve_app.client() as c:
        if headers:
            c.headers.update(headers)
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == etype and err["message"]
    assert err["param"] == param


def test_app_keeps_serving_after_bad_input(serve_app):
    with serve_app.client() as c:
        r = c.post(CMPL, json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


async def test_full_queue_gets_429_with_retry_after(serve_app):
    """tiny-b's engine admits 2 requests; the rest are refused until they finish."""
    headers = {"Authorization": f"Bearer {serve_app.api_key}"}
    body = {
        "model": "tiny-b",
        "prompt": "count",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0.5,
    }
    async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=60) as c:
        reqs = [c.build_request("POST", CMPL, json=body) for _ in range(6)]
        responses = await asyncio.gather(*(c.send(r, stream=True) for r in reqs))
        try:
            statuses = sorted(r.status_code for r in responses)
            assert statuses.count(200) == 2 and statuses.count(429) == 4, statuses
            refused = next(r for r in responses if r.status_code == 429)
            assert refused.headers["retry-after"] == "1"
            err = (await refused.aread()).decode()
            assert '"type":"rate_limit_error"' in err.replace(" ", "")
        finally:
            for r in responses:
                await r.aclose()
    # Once the streams are gone the model takes requests again.
    deadline = time.monotonic() + 5
    while True:
        with serve_app.client() as c:
            r = c.post(CMPL, json={**GOOD, "model": "tiny-b"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


async def test_full_handle_queue_gets_503_with_retry_after(serve_app):
    """tiny-q takes one request at a time and lets one more wait; a third is refused."""
    headers = {"Authorization": f"Bearer {serve_app.api_key}"}
    long = {
        "model": "tiny-q",
        "prompt": "hold",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    short = {"model": "tiny-q", "prompt": "wait", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=60) as c:
        holder = await c.send(c.build_request("POST", CMPL, json=long), stream=True)
        try:
            assert holder.status_code == 200
            waiting = asyncio.ensure_future(c.post(CMPL, json=short))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            refused = await c.post(CMPL, json=short)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            err = refused.json()["error"]
            assert (err["type"], err["code"]) == ("service_unavailable_error", "queue_full")
        finally:
            await holder.aclose()
        served = await asyncio.wait_for(waiting, 30)  # the waiting one runs once the slot frees
        assert served.status_code == 200, served.text


# ---- models, aliases, cache, service endpoints --------------------------------------------
def test_two_models_and_alias_split(serve_app):
    with serve_app.client() as c:
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["tiny", "tiny-b", "tiny-q", "tiny-canary"]
        req = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
        a = c.post(CMPL, json={**req, "model": "tiny"}).json()
        b = c.post(CMPL, json={**req, "model": "tiny-b"}).json()
        assert (a["model"], b["model"]) == ("tiny", "tiny-b")
        assert a["choices"][0]["text"] != b["choices"][0]["text"]  # different weights

        served = collections.Counter()
        for i in range(200):
            r = c.post(CMPL, json={"model": "tiny-canary", "prompt": f"p{i}", "max_tokens": 1})
            assert r.status_code == 200, r.text
            version = r.headers["x-kvmesh-model-version"]
            assert r.json()["model"] == version
            served[version] += 1
    # Binomial(200, 0.9): mean 180, sd 4.2; these bounds are > 4 sd out.
    assert 162 <= served["tiny"] <= 197 and served["tiny"] + served["tiny-b"] == 200, served


def test_response_cache_hits_deterministic_requests_only(serve_app):
    with serve_app.client() as c:
        body = {"model": "tiny", "prompt": "cache me if you can", "max_tokens": 6, "seed": 7}
        first = c.post(CMPL, json=body)
        second = c.post(CMPL, json=body)
        assert first.headers["x-kvmesh-cache"] == "miss"
        assert second.headers["x-kvmesh-cache"] == "hit"
        assert second.json()["choices"] == first.json()["choices"]
        assert second.json()["usage"] == first.json()["usage"]
        sampled = {"model": "tiny", "prompt": "cache me if you can", "max_tokens": 6}
        assert c.post(CMPL, json=sampled).headers["x-kvmesh-cache"] == "miss"
        assert c.post(CMPL, json=sampled).headers["x-kvmesh-cache"] == "miss"


def test_health_ready_and_metrics(serve_app):
    with serve_app.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["replicas"]["tiny"] >= 1
        c.post(CMPL, json={**GOOD, "stream": True})
        time.sleep(0.5)  # one stats push
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    required = [
        "kvmesh:num_requests_running",
        "kvmesh:num_requests_waiting",
        "kvmesh:kv_cache_usage_perc",
        "kvmesh:prefix_cache_queries",
        "kvmesh:prefix_cache_hits",
        "kvmesh:time_to_first_token_seconds",
        "kvmesh:inter_token_latency_seconds",
        "kvmesh:e2e_request_latency_seconds",
        "kvmesh:prompt_tokens",
        "kvmesh:generation_tokens",
        "kvmesh:num_preemptions",
        "kvmesh:engine_step_seconds",
        "kvmesh:engine_cpu_wait_seconds",
    ]
    for name in required:
        assert name in families, name
        models = {s.labels.get("model_name") for s in families[name].samples}
        assert {"tiny", "tiny-b"} <= models, (name, models)
    generated = sum(
        s.value
        for s in families["kvmesh:generation_tokens"].samples
        if s.labels["model_name"] == "tiny"
    )
    assert generated > 0
    stepped = sum(
        s.value
        for s in families["kvmesh:engine_step_seconds"].samples
        if s.labels["model_name"] == "tiny"
    )
    assert stepped > 0
    overhead = families["kvmesh:serving_overhead_seconds"].samples
    stages = {s.labels["stage"] for s in overhead}
    assert stages == {"ingress_to_engine", "engine_to_sse", "ingress_handling", "handle_to_replica"}


# ---- disconnects and crashes ---------------------------------------------------------------
def test_client_disconnect_frees_kv_blocks(serve_app):
    body = {
        "model": "tiny",
        "prompt": "go on and on",
        "max_tokens": 3500,
        "ignore_eos": True,
        "stream": True,
        "temperature": 1.0,
    }
    with serve_app.client() as c, c.stream("POST", CMPL, json=body) as r:
        assert r.status_code == 200
        replica = r.headers["x-kvmesh-replica"]
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        busy = None
        for _ in range(50):  # wait for a stats push that shows the request holding blocks
            mine = [s for s in serve_app.replicas("tiny") if s["replica"] == replica]
            # Both: a push can come between admission and the engine's first step, when the
            # request is in flight but the engine's last stats still show every block free.
            stats = mine[0]["stats"] if mine else {}
            if stats.get("num_in_flight") and stats["kv_blocks_free"] < stats["kv_blocks_total"]:
                busy = stats
                break
            time.sleep(0.05)
        assert busy is not None and busy["kv_blocks_free"] < busy["kv_blocks_total"]
        # leaving the block closed the connection mid-stream
    disconnected = time.monotonic()
    while True:
        stats = next(s["stats"] for s in serve_app.replicas("tiny") if s["replica"] == replica)
        if stats["kv_blocks_free"] == stats["kv_blocks_total"] and not stats["num_in_flight"]:
            break
        assert time.monotonic() - disconnected < 2.0, stats
        time.sleep(0.05)
    assert stats["generation_tokens"] - busy["generation_tokens"] < 3000  # aborted, not finished


def test_replica_killed_mid_stream_gives_error_event_then_recovers(serve_app, oai):
    from ray import serve

    raw = oai.completions.with_raw_response.create(
        model="tiny",
        prompt="this replica is about to die",
        max_tokens=500,
        stream=True,
        extra_body={"ignore_eos": True},
        extra_headers={"x-kvmesh-debug-crash-after": "3"},
    )
    doomed = raw.headers["x-kvmesh-replica"]
    stream = raw.parse()
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert time.monotonic() - started < 30
    assert len(received) <= 3  # cut off mid-stream (empty-text tokens send no chunk)
    assert "failed" in str(info.value.message)

    for i in range(6):  # the survivor (and soon the replacement) serves the next requests
        got = oai.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"still there {i}?"}],
            max_tokens=3,
        )
        assert got.choices[0].message.content is not None

    deadline = time.monotonic() + 90
    while True:
        status = serve.status().applications["kvmesh-test"].deployments["model-tiny"]
        running = status.replica_states.get("RUNNING", 0)
        live = {r["replica"] for r in serve_app.replicas("tiny")}
        if running == 2 and len(live) == 2 and doomed not in live:
            break
        assert time.monotonic() < deadline, (status, live)
        time.sleep(0.5)
