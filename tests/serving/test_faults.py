"""Fault injection on the real Serve app: what clients see, how long until serving resumes, and
that nothing leaks (KV blocks, actors, processes).

Faults: one request's processing raises inside the engine; the engine loop itself raises; the
stats hub is killed; the ingress replica is killed. (A replica process killed mid-stream is in
``test_serve_app.py``; a killed tensor-parallel worker in ``tests/tp``.) Each test waits until
the app is whole again, so the tests after it see the same app as before.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import pytest

pytestmark = pytest.mark.slow

GOOD = {"model": "tiny", "prompt": "fault tolerance", "max_tokens": 4, "temperature": 0}


@dataclass(frozen=True)
class Actor:
    name: str
    pid: int


def _actors(pattern: str = "") -> list[Actor]:
    """This test cluster's live actors, from the GCS (the tests run without a dashboard)."""
    from ray._private import state

    return [
        Actor(a["Name"], a["Pid"])
        for a in state.actors().values()
        if a["State"] == "ALIVE" and pattern in (a["Name"] or "")
    ]


def _kill(pattern: str) -> None:
    import ray

    (actor,) = _actors(pattern)
    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)


def assert_nothing_leaked(before: list) -> None:
    """As many live actors as before, and the process of every actor that went is gone."""
    import psutil

    after = _actors()
    assert len(after) == len(before), (before, after)
    live = {a.pid for a in after}
    for gone in {a.pid for a in before} - live:
        assert not psutil.pid_exists(gone) or psutil.Process(gone).status() == "zombie", gone


def wait_whole(serve_app, timeout_s: float = 120) -> float:
    """Until every model has exactly its replicas, all healthy and idle with every KV block
    free, and /ready says so; returns the seconds it took."""
    expected = {m["name"]: m["replicas"] for m in serve_app.config["models"]}
    start = time.monotonic()
    last = None
    with serve_app.client() as c:
        while time.monotonic() - start < timeout_s:
            try:
                ready = c.get("/ready")
                snaps = c.get("/debug/replicas").json() if ready.status_code == 200 else []
            except httpx.HTTPError as exc:
                last = repr(exc)
                time.sleep(0.3)
                continue
            counts = {m: 0 for m in expected}
            for snap in snaps:
                s = snap["stats"]
                idle = s["num_in_flight"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
                if s.get("healthy") and idle and snap["model"] in counts:
                    counts[snap["model"]] += 1
            listed = sum(1 for snap in snaps if snap["model"] in counts)
            if counts == expected and listed == sum(expected.values()):  # no one left over
                return time.monotonic() - start
            last = (ready.status_code, counts)
            time.sleep(0.3)
    raise AssertionError(f"app not whole after {timeout_s}s: {last}")


def wait_gone(serve_app, model: str, replica: str, timeout_s: float = 60) -> None:
    """Until ``replica`` no longer reports: Serve stopped it (its last push may outlive it by
    the hub's expiry)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if replica not in {s["replica"] for s in serve_app.replicas(model)}:
            return
        time.sleep(0.3)
    raise AssertionError(f"{replica} still reports after {timeout_s}s: it was not replaced")


def first_success_after(serve_app, start: float, timeout_s: float = 90) -> float:
    """Seconds from ``start`` until a normal request succeeds."""
    with serve_app.client() as c:
        while time.monotonic() - start < timeout_s:
            try:
                if c.post("/v1/completions", json=GOOD).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"no request succeeded within {timeout_s}s")


def test_a_request_fault_fails_that_request_alone(serve_app):
    wait_whole(serve_app)
    replicas_before = {s["replica"] for s in serve_app.replicas("tiny-b")}

    async def main():
        headers = {"Authorization": f"Bearer {serve_app.api_key}"}
        async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=60) as c:
            body = {**GOOD, "model": "tiny-b", "max_tokens": 12, "ignore_eos": True}
            good = asyncio.ensure_future(c.post("/v1/completions", json=body))
            await asyncio.sleep(0.05)
            bad = await c.post(
                "/v1/completions", json=body, headers={"x-kvmesh-debug-fault": "request"}
            )
            return bad, await good

    bad, good = asyncio.run(main())
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["code"] == "request_failed" and "error id" in error["message"]
    assert "debug hook" not in error["message"]  # internals stay in the replica's log
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 12
    # The same replica keeps serving: nothing was replaced.
    assert {s["replica"] for s in serve_app.replicas("tiny-b")} == replicas_before
    wait_whole(serve_app, timeout_s=10)


def test_engine_loop_fault_fails_its_requests_clearly_and_the_replica_is_replaced(serve_app):
    wait_whole(serve_app)
    actors_before = _actors()

    async def main():
        headers = {"Authorization": f"Bearer {serve_app.api_key}"}
        async with httpx.AsyncClient(base_url=serve_app.url, headers=headers, timeout=60) as c:
            body = {**GOOD, "max_tokens": 200, "ignore_eos": True, "stream": True}
            events = []
            async with c.stream(
                "POST", "/v1/completions", json=body, headers={"x-kvmesh-debug-fault": "engine"}
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                return r, events

    started = time.monotonic()
    response, events = asyncio.run(main())
    if response.status_code == 200:
        # Admitted, then the engine died: an error event, then [DONE].
        assert events[-1] == "[DONE]" and '"error"' in events[-2], events
        message = events[-2]
        doomed = response.headers["x-kvmesh-replica"]
    else:  # it died before admitting: refused with a status a client retries
        assert response.status_code == 503 and response.headers["retry-after"]
        message, doomed = str(events), None
    assert "retry" in message and "debug hook" not in message  # no internals
    resumed = first_success_after(serve_app, started)
    if doomed is not None:
        wait_gone(serve_app, "tiny", doomed)  # Serve replaced it
    whole = wait_whole(serve_app)
    assert_nothing_leaked(actors_before)
    print(f"engine fault: serving resumed after {resumed:.1f}s, app whole after {whole:.1f}s")


def _generation_tokens(c: httpx.Client) -> dict[str, float]:
    """Each replica's ``kvmesh:generation_tokens_total`` from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        sample.labels["replica"]: sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
        if sample.name == "kvmesh:generation_tokens_total"
    }


def test_killed_stats_hub_loses_no_metrics(serve_app):
    wait_whole(serve_app)
    actors_before = _actors()
    with serve_app.client() as c:
        before = _generation_tokens(c)
        _kill("kvmesh-stats")
        started = time.monotonic()
        # Requests are served throughout; /metrics answers 200 (Serve holds the call until
        # the new hub is up) or 503 with Retry-After, never anything else.
        sent = 0
        while time.monotonic() - started < 10:
            body = {**GOOD, "prompt": f"hub down {sent}"}  # distinct: no response-cache hits
            assert c.post("/v1/completions", json=body).status_code == 200
            sent += 1
            r = c.get("/metrics")
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["retry-after"]
            time.sleep(0.2)
        whole = wait_whole(serve_app)
        after = _generation_tokens(c)
    # Every replica is back in the merged metrics with its cumulative count: nothing lost.
    assert set(after) == set(before), (before, after)
    assert all(after[r] >= before[r] for r in before), (before, after)
    tiny = [r for r in before if r.startswith("tiny#")]
    assert sum(after[r] - before[r] for r in tiny) >= sent * GOOD["max_tokens"], (before, after)
    assert_nothing_leaked(actors_before)
    print(f"stats hub killed: app whole {whole:.1f}s after the 10 s of traffic")


def test_killed_ingress_is_replaced_and_serving_resumes(serve_app):
    wait_whole(serve_app)
    actors_before = _actors()
    _kill("kvmesh-ingress")
    started = time.monotonic()
    resumed = first_success_after(serve_app, started)
    wait_whole(serve_app)
    assert_nothing_leaked(actors_before)
    print(f"ingress killed: serving resumed after {resumed:.1f}s")
