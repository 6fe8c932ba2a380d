"""Peer routers for ``bench/router_real.py``: sglang-router and vllm-router in front of kvmesh.

The peers are Rust binaries from pip wheels, installed in their own virtual environment (never
kvmesh's): ``python3.11 -m venv /work/peers/router-venv && /work/peers/router-venv/bin/pip
install sglang-router==0.3.2 vllm-router==0.1.17`` (``KVMESH_PEER_VENV`` points elsewhere).
Each runs on loopback with one worker URL per kvmesh backend (a single-replica kvmesh app).

Between the peer and kvmesh sits a small pass-through proxy (``shim``, this file run as a
script), because kvmesh cannot take what the peers forward as it is:

* both peers re-serialise every chat request with SGLang's extension fields at their default
  values (``no_stop_trim``, ``skip_special_tokens``, ``separate_reasoning``, ...), and kvmesh's
  strict request schema refuses unknown fields (400). The shim drops exactly those fields
  when they hold the defaults the peers fill in, and nothing else;
* vllm-router's cache-aware policy matches prefixes of token ids, which it asks every worker
  for, for every request (``POST /v1/chat/completions/render``, else ``POST /tokenize``: vLLM's
  endpoints). kvmesh serves neither; without them every decision is ``missing_tokens`` (its
  ``vllm_router_prefix_routing_decisions_total``) and the policy never sees a prefix. The shim
  answers ``/tokenize`` as a vLLM server does (``count``, ``max_model_len``, ``tokens``), with
  kvmesh's own tokenisation of the conversation (the ids the replica will see); ``/render``
  it answers 404 itself, as kvmesh would, so that probe costs no trip through Serve.

Everything else (health checks, metadata probes, the chat stream and its headers) passes through
unchanged. The shim counts what it saw per path and status (``GET /__shim/calls``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

EXTENSION_DEFAULTS = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
}
"""SGLang request fields both peers add to every chat request, with the values they add."""

UNSERVED_PROBE = "/v1/chat/completions/render"
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


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
def shim(port: int, upstream: str, engine: dict[str, Any], log: Path) -> Iterator[str]:
    """The pass-through proxy to ``upstream`` (Serve's HTTP address), at the URL it yields;
    ``engine``: the backends' engine arguments (its ``/tokenize`` uses their tokenizer)."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "shim", "--port", str(port), "--upstream", upstream]
    cmd += ["--engine", json.dumps(engine)]
    with process(cmd, log, f"{url}/__shim/calls", lambda r: r.status_code == 200, 60):
        yield url


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


# ---- the shim itself -----------------------------------------------------------------------
def scrub(body: bytes) -> bytes:
    """``body`` without the peers' extension fields that hold their default values."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    drop = {k for k, v in EXTENSION_DEFAULTS.items() if k in data and data[k] == v}
    if not drop:
        return body
    return json.dumps({k: v for k, v in data.items() if k not in drop}).encode()


def tokenizer(engine: dict[str, Any]):
    """vLLM's ``/tokenize`` body -> its answer, from kvmesh's own input processing."""
    from kvmesh.router.protocol import ChatMessage
    from kvmesh.router.tokenization import load_model_info

    info = load_model_info("shim", engine)

    def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        if "messages" in body:
            messages = [ChatMessage.model_validate(m).for_template() for m in body["messages"]]
            _, ids = info.encode_chat(messages)
        else:
            _, ids = info.encode(body["prompt"])
        return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}

    return tokenize


def run_shim(port: int, upstream: str, engine: dict[str, Any]) -> None:
    import asyncio

    import aiohttp
    from aiohttp import web

    calls: Counter[str] = Counter()
    tokenize = tokenizer(engine)

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        )

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def show_calls(request: web.Request) -> web.Response:
        return web.json_response(dict(calls))

    async def forward(request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path
        if request.method == "POST" and path.endswith(UNSERVED_PROBE):
            calls[f"{request.method} {path} 404 (answered by the shim)"] += 1
            return web.json_response({"error": {"message": "not served by kvmesh"}}, status=404)
        body = await request.read()
        if request.method == "POST" and path.endswith("/tokenize"):
            calls[f"{request.method} {path} 200 (answered by the shim)"] += 1
            # HF tokenizers release the GIL: streams keep flowing while it encodes.
            answer = await asyncio.to_thread(tokenize, json.loads(body))
            return web.json_response(answer)
        if request.method == "POST":
            body = scrub(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(
            request.method, f"{upstream}{request.rel_url}", data=body, headers=headers
        ) as up:
            calls[f"{request.method} {path} {up.status}"] += 1
            response = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1 << 30)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/__shim/calls", show_calls)
    app.router.add_route("*", "/{tail:.*}", forward)
    try:  # uvloop when there: the shim's own cost stays out of the peers' latency
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pass-through proxy between a peer router and kvmesh")
    p.add_argument("mode", choices=["shim"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="kvmesh's (Serve's) HTTP address")
    p.add_argument("--engine", type=json.loads, default={}, help="engine arguments, JSON")
    args = p.parse_args(argv)
    run_shim(args.port, args.upstream.rstrip("/"), args.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
