"""Two Ray nodes on this machine (``ray start --head`` + ``ray start --address``, token auth,
one CPU each), the app deployed on them with ``kvmesh deploy``; then the worker node dies.

* One replica on each node (``max_replicas_per_node: 1``); the ingress and the stats hub on
  the head (``ingress_on_head``). Concurrent requests are answered by both replicas, and
  Serve's own view places them on different nodes.
* The worker node is killed (every process of it, SIGKILL) while streams run on both
  replicas: streams on the lost replica end with an SSE error event, those on the head's
  replica finish, nothing hangs; requests sent afterwards are all answered, by the head's
  replica; ``/ready`` and ``/metrics`` show one replica left.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from kvmesh_testing import free_port
from ray_nodes import RayNodes

pytestmark = pytest.mark.slow

MODEL = "smol"
STREAM_TOKENS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = RayNodes()
    port = free_port()
    config = tmp_path_factory.mktemp("two-nodes") / "kvmesh.yaml"
    config.write_text(
        f"""
host: 127.0.0.1
port: {port}
ingress_on_head: true
proxy_location: HeadOnly
models:
  - name: {MODEL}
    replicas: 2
    max_replicas_per_node: 1
    num_cpus: 1
    torch_threads: 1
    engine: {{max_model_len: 1024, num_kv_blocks: 192}}
"""
    )
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_worker("worker", num_cpus=1)
        nodes.wait_for_nodes(2)
        done = nodes.kvmesh("deploy", "--config", str(config), timeout_s=900)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"serving at http://127.0.0.1:{port}" in done.stdout
        yield nodes, f"http://127.0.0.1:{port}"
    finally:
        nodes.shutdown()


def replica_nodes(nodes: RayNodes) -> dict[str, str]:
    """Serve's view: each running model replica's header name -> its node id."""
    deployments = nodes.serve_details()["applications"]["kvmesh"]["deployments"]
    return {
        f"{MODEL}#{r['replica_id']}": r["node_id"]
        for name, d in deployments.items()
        if name.endswith(MODEL)
        for r in d["replicas"]
        if r["state"] == "RUNNING"
    }


def complete(url: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_replicas_on_both_nodes_serve(cluster):
    nodes, url = cluster
    placed = replica_nodes(nodes)
    head = next(n["raylet"]["nodeId"] for n in nodes.alive_nodes() if n["raylet"]["isHeadNode"])
    assert len(placed) == 2 and len(set(placed.values())) == 2, placed
    assert head in placed.values()
    seen: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for wave in range(6):
            prompts = [f"Wave {wave}, question {i}: name a colour." for i in range(8)]
            for r in pool.map(lambda p: complete(url, p), prompts):
                assert r.status_code == 200, r.text
                seen.add(r.headers["x-kvmesh-replica"])
            if seen == set(placed):
                break
    assert seen == set(placed), f"answered by {seen}, running {placed}"
    ready = httpx.get(f"{url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["replicas"] == {MODEL: 2}


@dataclass
class Stream:
    replica: str = ""
    tokens: int = 0
    done: bool = False
    error: dict | None = None
    exception: str | None = None
    ended_at: float = 0.0
    events: list[str] = field(default_factory=list)


def run_stream(url: str, i: int, out: Stream) -> None:
    body = {
        "model": MODEL,
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            out.replica = r.headers.get("x-kvmesh-replica", "")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"]
                else:
                    out.tokens += 1
    except httpx.HTTPError as exc:  # a stream cut without an event: what must not happen
        out.exception = repr(exc)
    out.ended_at = time.monotonic()


def test_worker_node_lost_mid_traffic(cluster):
    nodes, url = cluster
    placed = replica_nodes(nodes)
    head = next(n["raylet"]["nodeId"] for n in nodes.alive_nodes() if n["raylet"]["isHeadNode"])
    on_head = next(r for r, node in placed.items() if node == head)
    on_worker = next(r for r, node in placed.items() if node != head)

    streams = [Stream() for _ in range(6)]
    threads = [
        threading.Thread(target=run_stream, args=(url, i, s), daemon=True)
        for i, s in enumerate(streams)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    # Both replicas are streaming before the worker dies.
    while not (
        any(s.replica == on_worker and s.tokens >= 3 for s in streams)
        and any(s.replica == on_head and s.tokens >= 3 for s in streams)
    ):
        assert time.monotonic() < deadline, [(s.replica, s.tokens) for s in streams]
        assert not any(s.ended_at for s in streams), streams
        time.sleep(0.1)
    killed_at = time.monotonic()
    nodes.kill("worker")

    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung after its node died"
    for s in streams:
        assert s.exception is None, s
        if s.replica == on_worker:
            # Ended, promptly, with an error event that says what happened (then [DONE]).
            assert s.error is not None and s.tokens < STREAM_TOKENS, s
            assert s.error["code"] == "replica_failed" and "retry" in s.error["message"], s
            assert s.ended_at - killed_at < 60, s
        else:
            assert s.replica == on_head, s
            assert s.done and s.error is None and s.tokens == STREAM_TOKENS, s

    # Requests sent now go to the surviving replica (none is lost on the dead one).
    for i in range(6):
        r = complete(url, f"After the loss, question {i}: name a fruit.")
        assert r.status_code == 200, r.text
        assert r.headers["x-kvmesh-replica"] == on_head

    # /ready and /metrics show one replica left, once the dead one's last stats expire.
    deadline = time.monotonic() + 60
    while True:
        ready = httpx.get(f"{url}/ready", timeout=10)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        if (
            ready.status_code == 200
            and ready.json()["replicas"] == {MODEL: 1}
            and on_worker not in metrics
        ):
            break
        assert time.monotonic() < deadline, (ready.text, on_worker in metrics)
        time.sleep(1)
    assert f'replica="{on_head}"' in metrics
