"""Peer routers for ``bench/router_real.py``: sglang-router and vllm-router in front of kvmesh.

The peers are Rust binaries from pip wheels, installed in their own virtual environment (never
kvmesh's): ``python3.11 -m venv /work/peers/router-venv && /work/peers/router-venv/bin/pip
install sglang-router==0.3.2 vllm-router==0.1.17`` (``KVMESH_PEER_VENV`` points elsewhere).
Each runs on loopback with one worker URL per kvmesh backend (a single-replica kvmesh app),
talking to kvmesh directly, as they would be deployed:

* both peers re-serialise every request with SGLang / vLLM extension fields at their default
  values; kvmesh accepts exactly those (``router.protocol.PEER_ROUTER_FIELDS``);
* vllm-router's cache-aware policy asks every worker for every request's token ids
  (``POST /v1/chat/completions/render``, which kvmesh answers 404, then ``POST /tokenize``,
  which kvmesh answers as vLLM does, with the ids its replicas see);
* sglang-router's ``power_of_two`` polls ``GET /get_load`` (kvmesh answers in SGLang's shape).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

PEER_VENV = Path(os.environ.get("KVMESH_PEER_VENV", "/work/peers/router-venv"))


@dataclass(frozen=True)
class Peer:
    binary: str
    args: tuple[str, ...]
    """Policy and options; the peers' own defaults otherwise (cache-aware: cache threshold
    0.3, balance thresholds 64 absolute / 1.5 relative)."""


# --shutdown-grace-period-secs: on SIGTERM sglang-router otherwise waits up to 180 s.
SGLANG = ("--log-level", "warn", "--shutdown-grace-period-secs", "5")
PEERS: dict[str, Peer] = {
    "sglang_cache_aware": Peer("sglang-router", ("launch", "--policy", "cache_aware", *SGLANG)),
    "sglang_power_of_two": Peer("sglang-router", ("launch", "--policy", "power_of_two", *SGLANG)),
    # vllm-router's other policies: kv_aware needs ZMQ KV events from vLLM workers (kvmesh
    # sends none); consistent_hash hashes session / user headers, which this workload omits.
    "vllm_router_cache_aware": Peer(
        "vllm-router", ("--policy", "cache_aware", "--log-level", "warning")
    ),
}


def binary(name: str) -> Path:
    path = PEER_VENV / "bin" / PEERS[name].binary
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: install the peer routers with `python3.11 -m venv {PEER_VENV} "
            f"&& {PEER_VENV}/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17` "
            "(or set KVMESH_PEER_VENV)"
        )
    return path


def command(name: str, port: int, metrics_port: int, workers: list[str]) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    startup = ["--worker-startup-check-interval", "1"]
    return [
        str(binary(name)),
        *PEERS[name].args,
        *where,
        *metrics,
        *startup,
        "--worker-urls",
        *workers,
    ]


@contextmanager
def process(cmd: list[str], log: Path, ready_url: str, ready, timeout_s: float) -> Iterator[None]:
    """Run ``cmd`` (output to ``log``) until the block ends; wait until ``ready(response)``
    holds for ``GET ready_url``. Its own process group, so stopping it stops all of it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}); see {log}")
            try:
                if ready(httpx.get(ready_url, timeout=5)):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[0]} not ready after {timeout_s:.0f}s; see {log}")
            time.sleep(0.3)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def peer(name: str, port: int, metrics_port: int, workers: list[str], log: Path) -> Iterator[str]:
    """Peer router ``name`` in front of ``workers``, at the URL it yields once every worker
    is registered and healthy (both peers answer ``/readiness`` with the count)."""
    url = f"http://127.0.0.1:{port}"

    def ready(r: httpx.Response) -> bool:
        return r.status_code == 200 and r.json().get("healthy_workers") == len(workers)

    with process(command(name, port, metrics_port, workers), log, f"{url}/readiness", ready, 120):
        yield url


def peer_counters(metrics_port: int) -> dict[str, float]:
    """The peer's own counters about its routing choices (cache hits / misses, balancing
    events, decisions, retries, per-worker counts), to explain where requests went."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    # vllm-router: *_decisions_total, processed_requests; sglang-router: worker_selection,
    # worker_cb_outcomes (per worker), upstream_responses; both: retries, errors.
    keep = re.compile("cache|decision|processed|selection|outcomes|upstream|balanc|retr|error")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total") and keep.search(s.name):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
