"""Shared pieces of the hardening benchmarks (``bench/overload.py``, ``bench/soak.py``).

* ``Server``: a serving process the benchmark starts itself (``kvmesh serve`` or vLLM's OpenAI
  server) in its own session, polled until ready, and stopped cleanly at the end: SIGINT
  first (both servers shut down on it), then SIGTERM / SIGKILL to its process group *and* to
  every process it started (Ray's workers put themselves in their own process groups, so the
  group alone does not reach them). Only processes descended from the one we started are
  ever signalled.
* ``send``: one HTTP request, streaming or not, recorded as an ``Outcome`` that keeps what
  ``loadgen.stream_request`` folds into an error string: the status, ``Retry-After``, whether
  an SSE error event came, whether ``data: [DONE]`` came after it, whether the connection
  broke or hung. ``classify`` turns an outcome into finished / clear error / LOST.
* ``open_loop``: Poisson arrivals at a rate that can change over time, bounded in count and
  in time, with a cap on requests in flight.
* ``ray_rss_mb`` (RSS of a server's ``ray::`` processes) and
  ``measure_capacity`` (a short closed-loop run with ``kvmesh.cluster.loadgen``).

Everything talks to 127.0.0.1 only (``loadgen.check_loopback``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from kvmesh.cluster import loadgen

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import free_port  # re-exported for the scripts

__all__ = ["free_port"]

KVMESH_BIN = Path(sys.executable).parent / "kvmesh"
KVMESH_MODEL = "SmolLM2-135M-Instruct"


# ---- server processes -----------------------------------------------------------------------
class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log's tail."""


class Server:
    """A server process in its own session; ``with Server(...) as s:`` starts and stops it."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        url: str,
        ready_path: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 600.0,
        stop_timeout_s: float = 60.0,
        cwd: Path | None = None,
    ) -> None:
        loadgen.check_loopback(url)
        self.name, self.cmd, self.url, self.ready_path = name, cmd, url, ready_path
        self.log_path, self.env, self.cwd = log_path, env, cwd
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after_s: float | None = None

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child keeps it open)
        self._started = time.monotonic()
        # A new session: a Ctrl-C in the terminal reaches only us, and we stop the server in
        # order (SIGINT lets kvmesh shut Ray down) instead of every process dying at once.
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = self._started + self.ready_timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerFailed(
                        f"{self.name} exited with {self.proc.returncode} before it was ready"
                        f"\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        self.ready_after_s = time.monotonic() - self._started
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
        raise ServerFailed(
            f"{self.name} not ready after {self.ready_timeout_s:.0f}s\n{self.log_tail()}"
        )

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGINT and wait; then SIGTERM, then SIGKILL whatever of ours is left."""
        if self.proc is None:
            return
        family = self.descendants()  # before the parent goes: orphans lose the link to it
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            with _quiet():
                self.proc.send_signal(signal.SIGINT)
            with _quiet():
                self.proc.wait(timeout=self.stop_timeout_s)
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in family if _alive(p)]
            if self.proc.poll() is None:
                with _quiet():
                    os.killpg(pgid, sig)
            for p in alive:
                with _quiet():
                    p.send_signal(sig)
            psutil.wait_procs(alive, timeout=grace)
            with _quiet():
                self.proc.wait(timeout=grace)
            if self.proc.poll() is not None and not any(_alive(p) for p in family):
                break
        self.proc = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _quiet:
    """Ignore the errors of signalling / waiting on a process that is already gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(
            exc_type, (ProcessLookupError, psutil.NoSuchProcess, subprocess.TimeoutExpired)
        )


def kvmesh_server(
    port: int, workdir: Path, replicas: int | None = 1, config: Path | None = None
) -> Server:
    """``kvmesh serve`` on 127.0.0.1:port, ready when ``GET /ready`` is 200 (every model has
    a loaded replica). RAY_ADDRESS is dropped so it starts its own local Ray cluster and
    never joins (or, on the way out, shuts down apps on) someone else's."""
    cmd = [str(KVMESH_BIN), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if replicas is not None:
        cmd += ["--replicas", str(replicas)]
    if config is not None:
        cmd += ["--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return Server(
        "kvmesh", cmd, f"http://127.0.0.1:{port}", "/ready", workdir / "kvmesh_serve.log", env
    )


VLLM_CACHE_VARS = (
    "XDG_CACHE_HOME",
    "VLLM_CACHE_ROOT",
    "VLLM_CONFIG_ROOT",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TMPDIR",
    "VLLM_RPC_BASE_PATH",
)


def vllm_scratch_env(scratch: Path) -> dict[str, str]:
    """Every cache and temp folder vLLM (and torch inductor, triton) writes, inside
    ``scratch``: nothing of a benchmark run lands in the home directory or /tmp at large."""
    env = {}
    for var in VLLM_CACHE_VARS:
        path = scratch / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    return env


def vllm_server(
    python: str, model_dir: str, port: int, workdir: Path, name: str, dtype: str = "float32"
) -> Server:
    """vLLM's OpenAI server (CPU build) from its own venv, every cache in ``workdir``."""
    scratch = workdir / "vllm-scratch"
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    env.update(vllm_scratch_env(scratch))
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        name,
    ]
    # ``python -m`` puts the working directory first on sys.path: started from the kvmesh
    # checkout, its ``kernels/`` folder would shadow the ``kernels`` package transformers probes.
    return Server(
        "vllm",
        cmd,
        f"http://127.0.0.1:{port}",
        "/v1/models",
        workdir / "vllm_serve.log",
        env,
        cwd=scratch,
    )


def kvmesh_model_dir() -> str:
    """The converted float32 SmolLM2 directory kvmesh serves (vLLM loads the same files)."""
    from kvmesh.replicas.model_files import resolve_model_dir

    return str(resolve_model_dir(None))


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM unwind as KeyboardInterrupt, so ``with Server`` blocks stop their
    servers. SIGINT explicitly too: a shell starts background jobs with SIGINT ignored, and
    Python then never installs its own handler."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ---- Ray processes of a server ----------------------------------------------------------------
def ray_rss_mb(server: Server, groups: dict[str, str]) -> dict[str, float]:
    """RSS (MB) of the server's ``ray::`` processes, per group: a process goes to the first
    group whose marker is in its command line; the rest to ``other``; ``total`` is the sum."""
    out = {g: 0.0 for g in groups} | {"other": 0.0, "total": 0.0}
    for p in server.descendants():
        try:
            cmd = " ".join(p.cmdline())
            if "ray::" not in cmd:
                continue
            rss = p.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        group = next((g for g, marker in groups.items() if marker in cmd), "other")
        out[group] += rss
        out["total"] += rss
    return out


# ---- one request ------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one request (times in seconds, ``sent`` relative to the run start)."""

    kind: str
    sent: float
    stream: bool
    status: int = 0
    """HTTP status; 0 if no response head arrived."""
    retry_after: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    done: bool = False
    """``data: [DONE]`` arrived."""
    error_event: str | None = None
    """Message of an SSE ``data: {"error": ...}`` event."""
    body_error: str | None = None
    """Error message of a non-200 response (or of a 200 body that is not a valid reply)."""
    exception: str | None = None
    """Transport error: connection refused / reset, protocol error, bad JSON."""
    timed_out: bool = False
    """No complete answer within the request's time limit (a hang)."""
    disconnected: bool = False
    """We closed the stream on purpose (a client that goes away)."""
    replica: str | None = None

    @property
    def ok(self) -> bool:
        return self.klass == "finished"

    @property
    def klass(self) -> str:
        return classify(self)[0]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def send(
    client: httpx.AsyncClient,
    path: str,
    outcome: Outcome,
    *,
    body: dict[str, Any] | None = None,
    raw: bytes | None = None,
    timeout_s: float,
    disconnect_after: int | None = None,
    t0: float,
) -> Outcome:
    """POST ``body`` (or the raw bytes ``raw``) and fill ``outcome``; never raises.

    ``timeout_s`` bounds the whole request (a stream that keeps trickling counts too);
    ``disconnect_after``: close the connection after that many text chunks. ``t0`` is the
    run's ``perf_counter`` origin (``outcome.sent`` is relative to it)."""
    start = time.perf_counter()
    outcome.sent = start - t0
    try:
        await asyncio.wait_for(
            _exchange(client, path, outcome, body, raw, disconnect_after, start), timeout_s
        )
    except TimeoutError:
        outcome.timed_out = True
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        outcome.exception = f"{type(exc).__name__}: {exc}"[:300]
    outcome.e2e = time.perf_counter() - start
    return outcome


async def _exchange(
    client: httpx.AsyncClient,
    path: str,
    o: Outcome,
    body: dict[str, Any] | None,
    raw: bytes | None,
    disconnect_after: int | None,
    start: float,
) -> None:
    kwargs: dict[str, Any] = {"json": body} if raw is None else {"content": raw}
    if raw is not None:
        kwargs["headers"] = {"content-type": "application/json"}
    async with client.stream("POST", path, **kwargs) as resp:
        o.status = resp.status_code
        o.retry_after = resp.headers.get("retry-after")
        o.replica = resp.headers.get("x-kvmesh-replica")
        if resp.status_code != 200 or not o.stream:
            text = (await resp.aread()).decode(errors="replace")
            _read_body(o, text)
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                o.done = True
                return
            data = json.loads(payload)
            if isinstance(data, dict) and "error" in data:
                err = data["error"]
                o.error_event = str(err.get("message") if isinstance(err, dict) else err)[:300]
                continue  # a well-behaved server follows it with [DONE]
            if data.get("choices") and loadgen._chunk_text(data["choices"][0]):
                if o.ttft is None:
                    o.ttft = time.perf_counter() - start
                o.tokens += 1
                if disconnect_after is not None and o.tokens >= disconnect_after:
                    o.disconnected = True
                    return  # leaving the block closes the connection mid-stream
            if usage := data.get("usage"):
                o.tokens = max(o.tokens, usage.get("completion_tokens") or 0)


def _read_body(o: Outcome, text: str) -> None:
    """A whole (non-streamed or error) response body: the error message, or the token count."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if o.status != 200:
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or text)
        o.body_error = str(msg)[:300] or f"HTTP {o.status} with an empty body"
        return
    if not isinstance(data, dict) or not data.get("choices"):
        o.body_error = f"200 without choices: {text[:200]!r}"
        return
    usage = data.get("usage") or {}
    o.tokens = usage.get("completion_tokens") or 0
    o.done = True


# ---- classification ---------------------------------------------------------------------------
def is_shed(o: Outcome) -> bool:
    """Load shedding done right: 429 or 503 that says when to retry."""
    return o.status in (429, 503) and o.retry_after is not None


def classify(o: Outcome) -> tuple[str, str]:
    """``(class, reason)``. Classes: ``finished``, ``client_disconnect`` (we left on purpose
    and the stream was fine until then), ``clear_error`` (the client was told clearly what
    went wrong), ``unexpected`` (a clear answer, but the wrong one: a bad request accepted or a
    good one refused with a 4xx) and ``lost`` (anything a client cannot act on)."""
    bad = o.kind.startswith("bad_")
    if o.timed_out:
        return "lost", "timeout (hang)"
    if o.exception:
        return "lost", "transport error: " + o.exception.split(":")[0]
    if o.status == 0:
        return "lost", "no response"
    if o.status != 200:
        if is_shed(o):
            return "clear_error", f"shed {o.status} + Retry-After"
        if o.status in (429, 503):
            return "lost", f"{o.status} without Retry-After"
        if o.status >= 500:
            return "lost", f"HTTP {o.status}"
        if bad:
            return "clear_error", f"bad request rejected {o.status}"
        return "unexpected", f"good request refused {o.status}"
    if bad:
        return "unexpected", "bad request accepted (200)"
    if o.body_error:
        return "lost", "200 with an invalid body"
    if o.error_event is not None:
        if o.done:
            return "clear_error", "SSE error event + [DONE]"
        return "lost", "SSE error event without [DONE]"
    if o.disconnected:
        return "client_disconnect", "client closed mid-stream"
    if not o.done:
        return "lost", "stream ended without [DONE]"
    return "finished", "ok"


# ---- load -------------------------------------------------------------------------------------
def poisson_arrivals(
    phases: list[tuple[str, float, float]], seed: int, max_requests: int
) -> list[tuple[float, str]]:
    """``(time, phase)`` arrival times for consecutive ``(phase, seconds, rate)`` phases;
    at most ``max_requests`` (a guard: rates come from a measurement)."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    start = 0.0
    for name, seconds, rate in phases:
        t = start
        while rate > 0 and len(out) < max_requests:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out.append((t, name))
        start += seconds
    return out


async def open_loop(
    arrivals: list[tuple[float, str]],
    fire: Callable[[int, str], Awaitable[Any]],
    *,
    max_inflight: int,
    drain_s: float,
) -> tuple[int, int]:
    """Call ``fire(i, phase)`` at each arrival time without waiting for earlier ones (open
    loop). Arrivals when ``max_inflight`` requests are open are dropped (counted, not sent) so
    the client never becomes the bottleneck silently. After the last arrival, waits at most
    ``drain_s`` for stragglers, then cancels them (``fire`` should record its outcome before
    awaiting, so a cancelled request is still seen). Returns (dropped, cancelled)."""
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[Any]] = []
    inflight = 0
    dropped = 0

    async def run(i: int, phase: str) -> Any:
        nonlocal inflight
        try:
            return await fire(i, phase)
        finally:
            inflight -= 1

    for i, (at, phase) in enumerate(arrivals):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if inflight >= max_inflight:
            dropped += 1
            continue
        inflight += 1
        tasks.append(asyncio.create_task(run(i, phase)))
    pending: set[asyncio.Task[Any]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return dropped, len(pending)


def completion_body(model: str, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Token-id prompt, greedy, ``ignore_eos``: exact input and output lengths."""
    return {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*loadgen.TOKEN_RANGE) for _ in range(n)]


def measure_capacity(
    url: str,
    model: str,
    input_len: int,
    output_len: int,
    concurrency: int,
    num_requests: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Closed-loop run with kvmesh's load generator: ``num_requests`` streamed completions,
    ``concurrency`` at a time. Capacity = completed requests per second over the run (the
    tail, where fewer than ``concurrency`` are open, slightly underestimates it)."""
    spec = loadgen.WorkloadSpec(
        num_requests=num_requests, input_len=input_len, output_len=output_len, seed=7
    )
    results, duration = asyncio.run(
        loadgen.run_load(
            url,
            model,
            loadgen.make_requests(spec),
            concurrency=concurrency,
            timeout_s=timeout_s,
        )
    )
    summary = loadgen.summarize(results, duration)
    return {
        "capacity_rps": summary["request_throughput"],
        "concurrency": concurrency,
        "requests": num_requests,
        "errors": summary["errors"],
        "error_examples": summary["error_examples"],
        "duration_s": duration,
        "ttft_ms": summary["ttft_ms"],
        "e2e_ms": summary["e2e_ms"],
    }


def warm_up(url: str, model: str, n: int = 4) -> None:
    """First-call costs (kernel load, allocator, compilation) out of the measurement."""
    spec = loadgen.WorkloadSpec(num_requests=n, input_len=16, output_len=4, seed=99)
    asyncio.run(
        loadgen.run_load(url, model, loadgen.make_requests(spec), concurrency=2, timeout_s=300)
    )


def pct_ms(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/mean in ms, as the load generator reports them."""
    return loadgen.percentiles(values)


def nearest_rank(values: list[float], p: float) -> float:
    """Nearest-rank percentile (same as loadgen's); ``inf`` entries sort last."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
