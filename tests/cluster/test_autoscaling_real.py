"""A real app scales 1 -> 2 -> 1 under load, and no request fails across either transition.

``kvmesh serve`` (its own local Ray cluster, in a subprocess) serves SmolLM2 autoscaled by
kvmesh's policy between 1 and 2 replicas, with short windows so the test takes about two
minutes. A burst of long prompts fills the prefill queue: the policy scales up. The burst stops
while long streams run on *both* replicas; the policy scales down, Serve stops routing to one
replica and lets it finish its streams before stopping it. Every request, streams included,
must finish normally; ``kvmesh status`` must show the app as it is.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kvmesh_testing import free_port, wait_until_ok

pytestmark = pytest.mark.slow

KVMESH = str(Path(sys.executable).parent / "kvmesh")
MODEL = "smol"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_queue_s": 1.0,
    "waiting_high": 4.0,
    "up_window_s": 1.0,
    "down_window_s": 4.0,
    "down_cooldown_s": 8.0,
    "target_utilization": 0.7,
    "down_utilization": 0.4,
}
STREAM_EVERY_S = 2.0
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "cat", "runs")


def long_prompt(rng: random.Random) -> str:
    """~500 tokens no other request shares (a shared prompt would be a prefix-cache hit and
    cost no prefill)."""
    return " ".join(rng.choice(WORDS) for _ in range(500))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    port = free_port()
    config = {
        "name": "kvmesh",
        "port": port,
        "stats_push_period_s": 0.5,
        "models": [
            {
                "name": MODEL,
                "engine": {"max_num_seqs": 32, "max_model_len": 2048},
                "num_cpus": 0,
                "torch_threads": 1,
                "max_queue_delay_s": None,  # this test wants a queue, not 429s
                "health_check_period_s": 1.0,
                "autoscaling": AUTOSCALING,
            }
        ],
    }
    path = tmp_path_factory.mktemp("autoscale") / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(path.with_suffix(".log"), "w")  # noqa: SIM115 - closed in the finaliser
    proc = subprocess.Popen(
        [KVMESH, "serve", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=path.parent,  # not the repository: its kernels/ would shadow the `kernels` package
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/ready", timeout_s=240, proc=proc, log=path.with_suffix(".log"))
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def autoscaler(url: str) -> dict:
    found = httpx.get(f"{url}/debug/autoscaler", timeout=10).json()
    return found[0] if found else {}


def replicas(url: str) -> list[dict]:
    return [s for s in httpx.get(f"{url}/debug/replicas", timeout=10).json()]


class Timeline:
    """What the autoscaler said and what each request did, stamped."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.decisions: list[tuple[float, int, int, str]] = []
        self.requests: list[dict] = []

    def now(self) -> float:
        return time.monotonic() - self.t0


async def watch(url: str, tl: Timeline, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while not stop.is_set():
            r = (await c.get("/debug/autoscaler")).json()
            if r:
                tl.decisions.append((tl.now(), r[0]["target"], r[0]["running"], r[0]["reason"]))
            await asyncio.sleep(0.5)


async def completion(c: httpx.AsyncClient, tl: Timeline, kind: str, **body) -> dict:
    start = tl.now()
    body = {"model": MODEL, "temperature": 0, "ignore_eos": True, **body}
    record = {"kind": kind, "start": start, "ok": False, "replica": None, "end": None}
    tl.requests.append(record)  # filled in as it goes: a stream's replica is known at once
    if body.get("stream"):
        async with c.stream("POST", "/v1/completions", json=body) as r:
            record["status"] = r.status_code
            record["replica"] = r.headers.get("x-kvmesh-replica")
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        finish = [ch["choices"][0].get("finish_reason") for ch in chunks if ch.get("choices")]
        record["ok"] = (
            r.status_code == 200
            and events[-1:] == ["[DONE]"]
            and "length" in finish
            and not any("error" in ch for ch in chunks)
        )
    else:
        r = await c.post("/v1/completions", json=body)
        record["status"] = r.status_code
        record["replica"] = r.headers.get("x-kvmesh-replica")
        record["ok"] = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    record["end"] = tl.now()
    return record


async def scenario(url: str, tl: Timeline) -> None:
    stop_watch = asyncio.Event()
    watcher = asyncio.create_task(watch(url, tl, stop_watch))
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        # 1. A burst of long prompts: queued prefill work far beyond target_queue_s.
        burst_over = asyncio.Event()

        async def burst_worker(seed: int) -> None:
            rng = random.Random(seed)
            while not burst_over.is_set():
                await completion(c, tl, "burst", prompt=long_prompt(rng), max_tokens=8)

        workers = [asyncio.create_task(burst_worker(i)) for i in range(10)]
        deadline = time.monotonic() + 150
        while len(replicas(url)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(1)
        if len(replicas(url)) < 2:
            for task in [*workers, watcher]:
                task.cancel()
            await asyncio.gather(*workers, watcher, return_exceptions=True)
            raise AssertionError(f"never scaled up: {autoscaler(url)}, {tl.decisions[-10:]}")
        tl.scaled_up = tl.now()
        # The burst goes on until the new replica has taken its share (closed-loop clients
        # send again only when an answer comes back).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            served = collections.Counter(r["replica"] for r in tl.requests if r["end"])
            if len(served) >= 2 and min(served.values()) >= 3:
                break
            await asyncio.sleep(0.5)
        # 2. The burst stops; a stream starts every few seconds, spread over both replicas by
        # the router, until the policy has scaled down: streams are in flight on the replica
        # that goes (few enough at once that one replica's batch slots hold them all).
        burst_over.set()
        await asyncio.gather(*workers)
        tl.burst_over = tl.now()
        streams: list[asyncio.Task] = []
        deadline = time.monotonic() + 120
        down_at = None
        while time.monotonic() < deadline:
            streams.append(
                asyncio.create_task(
                    completion(c, tl, "stream", prompt="a long story:", max_tokens=300, stream=True)
                )
            )
            await asyncio.sleep(STREAM_EVERY_S)
            if down_at is None and any(d[1] == 1 for d in tl.decisions if d[0] > tl.scaled_up):
                down_at = time.monotonic()
            if down_at is not None and time.monotonic() - down_at > 2 * STREAM_EVERY_S:
                break
        # 3. Every stream finishes; one replica is left.
        await asyncio.gather(*streams)
        deadline = time.monotonic() + 120
        while len(replicas(url)) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(1)
        tl.scaled_down = tl.now()
    stop_watch.set()
    await watcher


def test_scales_up_under_load_and_back_down_without_losing_a_request(app, tmp_path):
    tl = Timeline()
    asyncio.run(scenario(app, tl))
    out = os.environ.get("KVMESH_AUTOSCALE_TIMELINE")
    if out:  # bench/autoscale_real.py plots it
        Path(out).write_text(json.dumps(vars(tl), default=str))

    failed = [r for r in tl.requests if not r["ok"]]
    assert not failed, failed[:5]
    targets = [d[1] for d in tl.decisions]
    assert 2 in targets and targets[-1] == 1, tl.decisions
    up = next(d for d in tl.decisions if d[1] == 2)
    down = next(d for d in tl.decisions if d[0] > up[0] and d[1] == 1)  # within 0.5 s
    report = autoscaler(app)
    assert report["scale_events_total"] == {"up": 1, "down": 1}, report
    reasons = report["decisions_total"]
    assert "down_low_load" in reasons and any(r.startswith("up_") for r in reasons), reasons
    # The replica that went away was still streaming when the scale-down was decided: the
    # drain, not luck, is why nothing failed.
    final = {s["replica"] for s in replicas(app)}
    assert len(final) == 1
    streams = [r for r in tl.requests if r["kind"] == "stream"]
    removed = [r for r in streams if r["replica"] not in final]
    assert removed and any(r["end"] > down[0] for r in removed), (down, streams)
    # Back to idle: every KV block free on the remaining replica (its stats reach the hub
    # every 0.5 s: the last push may predate the last stream's end).
    deadline = time.monotonic() + 15
    while True:
        (snap,) = replicas(app)
        if snap["stats"]["kv_blocks_free"] == snap["stats"]["kv_blocks_total"]:
            break
        assert time.monotonic() < deadline, snap["stats"]
        time.sleep(0.5)

    # `kvmesh status` shows it.
    status = subprocess.run(
        [KVMESH, "status", "--url", app, "--json"], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    (model,) = json.loads(status.stdout)
    assert model["model"] == MODEL and len(model["replicas"]) == 1
    assert model["autoscaler"]["target"] == 1
    text = subprocess.run(
        [KVMESH, "status", "--url", app], capture_output=True, text=True, timeout=60
    ).stdout
    assert "autoscaler: target 1 [1..2]" in text and "last decision" in text, text
    print(
        f"scaled up at {tl.scaled_up:.1f}s, burst over at {tl.burst_over:.1f}s, "
        f"down decided at {down[0]:.1f}s, one replica at {tl.scaled_down:.1f}s; "
        f"{len(tl.requests)} requests, {len(streams)} streams ({len(removed)} on the "
        "removed replica), 0 failed"
    )
