"""Soak: mixed traffic at ~80 % of capacity for D minutes while replicas are killed.

The script starts ``kvmesh serve --replicas 2 --config <a small YAML in a temp dir>`` (the
embedded SmolLM2, one torch thread per replica), warms it up, measures capacity ``C`` with a
short closed-loop run of streamed completions (kvmesh's load generator; or ``--capacity-rps``),
then sends Poisson arrivals for ``--minutes`` so that the requests that generate tokens arrive
at ``--load-fraction`` x C (bad requests come on top: they cost the server next to nothing).

The mix (``MIX``): streamed and non-streamed ``/v1/completions`` (token-id prompts,
``ignore_eos``) and ``/v1/chat/completions``; clients that close the connection mid-stream;
bad requests (invalid JSON, an unknown field, out-of-range values, token ids outside the
vocabulary, a prompt longer than the context, an unknown model, empty messages), which must
get a 4xx. Every ``--kill-every-minutes`` (at the first moment within 30 s when every replica
has requests running, so that the kill cuts streams) one model replica process is killed with
SIGKILL.
Replica processes are found by the title Ray gives them (``ray::ServeReplica:<app>:model-...``)
among the processes descended from the server we started, so nothing else on the machine is
ever signalled. (Ray's state API, ``ray list actors``, is no help here: it needs the
dashboard's HTTP API, and ``kvmesh serve`` starts Ray with ``include_dashboard=False``.)

Every request is classified (``serving_harness.classify``):

* ``finished``: a 200 with a valid body, or a stream that ends with ``data: [DONE]``;
* ``client_disconnect``: we closed the stream on purpose and it was fine until then;
* ``clear_error``: a 4xx for a bad request; 429/503 with ``Retry-After``; a stream cut by a
  replica kill that says so (an SSE ``data: {"error": ...}`` event, then ``data: [DONE]``);
* ``unexpected``: a bad request accepted, or a good one refused with a 4xx;
* ``lost``: no response, a hang past ``--request-timeout-s``, a connection reset without an
  error, a stream that ends without ``[DONE]``, an error event without ``[DONE]``, a 5xx other
  than 503 + ``Retry-After``, a 429/503 without ``Retry-After``. The goal is zero.

Every ``--sample-s`` (10 s): RSS of the server's ``ray::`` processes (ingress, model replicas,
the rest), ``GET /debug/replicas`` (KV blocks free/total, requests running/waiting per
replica) and requests finished since the last sample. Per minute: p99 of e2e and TTFT.
After each kill: ``replica_replaced_s`` (until ``/debug/replicas`` shows a replica id that was
not there before the kill, pushing fresh stats, and two fresh replicas in all) and
``serving_resumed_s`` (until the first request sent after the kill finishes; the surviving
replica keeps serving) and ``new_replica_first_ok_s`` (until a request finishes on the
replacement, whose id the ``x-kvmesh-replica`` header names). At the end the
traffic stops, we wait for idle and check that every replica's KV blocks are all free again
(``kv_all_free``).

Output: the JSON summary on stdout (progress on stderr), and ``--plot`` (default
``bench/out/soak.png``): throughput, p99 and RSS over time, kills marked.

    .venv/bin/python bench/soak.py                                 # 30 minutes, kill every 5
    .venv/bin/python bench/soak.py --minutes 2 --kill-every-minutes 1   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import serving_harness as h

OUT = Path(__file__).parent / "out"
APP = "kvmesh-soak"
MODEL = h.KVMESH_MODEL
# Share of arrivals per request kind. The bad_* kinds are spread evenly over BAD_KINDS.
MIX = {
    "completion_stream": 0.25,
    "completion": 0.15,
    "chat_stream": 0.20,
    "chat": 0.10,
    "disconnect_stream": 0.15,
    "bad": 0.15,
}
BAD_KINDS = (
    "bad_json",
    "bad_unknown_field",
    "bad_temperature",
    "bad_top_p",
    "bad_max_tokens",
    "bad_token_ids",
    "bad_too_long",
    "bad_model",
    "bad_empty_messages",
)
BUSY_WAIT_S = 30.0  # before a kill, wait at most this long for every replica to be busy
STALE_S = 3.0  # a replica pushes stats every 0.5 s; older than this = not (or no longer) serving
TOPICS = ("caches", "rivers", "trains", "bees", "clocks", "maps", "lamps", "kites")


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the server ---------------------------------------------------------------------------------
def write_config(workdir: Path, port: int, max_model_len: int) -> Path:
    """Two replicas of the embedded model, one thread each (this machine's 2 cores); a short
    graceful shutdown so a replaced replica does not linger."""
    config = {
        "name": APP,
        "host": "127.0.0.1",
        "port": port,
        "models": [
            {
                "name": MODEL,
                "engine": {"model": None, "max_model_len": max_model_len},
                "replicas": 2,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "graceful_shutdown_timeout_s": 5.0,
            }
        ],
    }
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def replica_processes(server: h.Server) -> list[dict[str, Any]]:
    """The server's model replica processes (not the ingress, the stats hub or Serve's own)."""
    out = []
    for p in server.descendants():
        try:
            title = " ".join(p.cmdline()).strip()  # Ray pads its process titles
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith(f"ray::ServeReplica:{APP}:model-"):
            out.append({"pid": p.pid, "title": title})
    return out


def kill_one_replica(server: h.Server, rng: random.Random) -> dict[str, Any]:
    """SIGKILL one model replica process (always one of the server's own descendants)."""
    candidates = replica_processes(server)
    if not candidates:
        return {"error": "no model replica process among the server's processes"}
    victim = rng.choice(candidates)
    os.kill(victim["pid"], signal.SIGKILL)
    return victim


# ---- requests -----------------------------------------------------------------------------------
def draw_kinds(n: int, rng: random.Random) -> list[str]:
    kinds, weights = zip(*MIX.items(), strict=True)
    out = []
    for kind in rng.choices(kinds, weights=weights, k=n):
        out.append(rng.choice(BAD_KINDS) if kind == "bad" else kind)
    return out


def build_request(kind: str, i: int, rng: random.Random, args: argparse.Namespace) -> dict:
    """``send`` keyword arguments (path, body or raw, stream, disconnect_after) for a kind."""
    prompt = h.random_prompt(rng, args.input_len)
    prompt[0] = 1000 + i % 19000  # a unique first block: no accidental prefix-cache hits
    completion = h.completion_body(MODEL, prompt, args.output_len)
    words = " ".join(rng.choice(TOPICS) for _ in range(args.input_len // 4))
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Request {i}. Write about {words}."}],
        "max_tokens": args.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    bad_stream = {"stream": bool(i % 2)}  # validation must come before any streaming
    req: dict[str, Any] = {"path": "/v1/completions", "stream": False}
    if kind == "completion_stream":
        req |= {"body": completion | stream, "stream": True}
    elif kind == "completion":
        req |= {"body": completion}
    elif kind == "chat_stream":
        req |= {"path": "/v1/chat/completions", "body": chat | stream, "stream": True}
    elif kind == "chat":
        req |= {"path": "/v1/chat/completions", "body": chat}
    elif kind == "disconnect_stream":
        after = rng.randint(1, max(1, args.output_len // 2))
        req |= {"body": completion | stream, "stream": True, "disconnect_after": after}
    elif kind == "bad_json":
        req |= {"raw": b'{"model": "%s", "prompt": "hi", "max_tokens": 4' % MODEL.encode()}
    elif kind == "bad_unknown_field":
        req |= {"body": completion | bad_stream | {"frobnicate": True}}
    elif kind == "bad_temperature":
        req |= {"body": completion | bad_stream | {"temperature": -1.0}}
    elif kind == "bad_top_p":
        req |= {"body": completion | bad_stream | {"top_p": 1.5}}
    elif kind == "bad_max_tokens":
        req |= {"body": completion | bad_stream | {"max_tokens": -3}}
    elif kind == "bad_token_ids":
        req |= {"body": completion | bad_stream | {"prompt": [5, 10**9, 7]}}
    elif kind == "bad_too_long":
        long_prompt = h.random_prompt(rng, args.max_model_len + 64)
        req |= {"body": completion | bad_stream | {"prompt": long_prompt}}
    elif kind == "bad_model":
        req |= {"body": completion | bad_stream | {"model": "no-such-model"}}
    elif kind == "bad_empty_messages":
        req |= {"path": "/v1/chat/completions", "body": chat | bad_stream | {"messages": []}}
    else:
        raise ValueError(kind)
    req["stream"] = req["stream"] or bool(req.get("body", {}).get("stream"))
    return req


# ---- the run ------------------------------------------------------------------------------------
class Soak:
    """Traffic, kills and samples, all on one event loop; every loop bounded in time."""

    def __init__(self, server: h.Server, rate: float, args: argparse.Namespace):
        self.server, self.rate, self.args = server, rate, args
        self.outcomes: list[h.Outcome] = []
        self.samples: list[dict[str, Any]] = []
        self.kills: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.rng = random.Random(args.seed)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self) -> dict[str, Any]:
        duration = self.args.minutes * 60
        arrivals = h.poisson_arrivals(
            [("soak", duration, self.rate)], self.args.seed, int(self.rate * duration * 2) + 100
        )
        kinds = draw_kinds(len(arrivals), random.Random(self.args.seed + 1))
        arrivals = [(t, kind) for (t, _), kind in zip(arrivals, kinds, strict=True)]
        log(f"{len(arrivals)} requests over {duration:.0f}s at {self.rate:.2f}/s")
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        timeout = httpx.Timeout(self.args.request_timeout_s + 30)
        async with httpx.AsyncClient(
            base_url=self.server.url, timeout=timeout, limits=limits
        ) as client:
            self.client = client
            self.t0 = time.perf_counter()
            stop = asyncio.Event()
            background = [
                asyncio.create_task(self.sampler(stop)),
                asyncio.create_task(self.killer(stop)),
            ]
            dropped, cancelled = await h.open_loop(
                arrivals,
                self.fire,
                max_inflight=1000,
                drain_s=self.args.request_timeout_s + 15,
            )
            for o in self.outcomes:
                if o.e2e is None:
                    o.timed_out = True  # still open after the drain limit: it hung
            idle = await self.wait_idle()
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            await self.sample()  # one last look, after idle
        return {"dropped": dropped, "cancelled": cancelled, **idle}

    async def fire(self, i: int, kind: str) -> None:
        req = build_request(kind, i, random.Random(self.args.seed * 100003 + i), self.args)
        o = h.Outcome(kind=kind, sent=self.now(), stream=req.pop("stream"))
        self.outcomes.append(o)  # before awaiting: a request cancelled at the end still counts
        await h.send(
            self.client,
            req.pop("path"),
            o,
            timeout_s=self.args.request_timeout_s,
            t0=self.t0,
            **req,
        )

    # ---- replica kills ----
    async def killer(self, stop: asyncio.Event) -> None:
        period = self.args.kill_every_minutes * 60
        if period <= 0:
            return
        for k in range(1, int(self.args.minutes * 60 // period) + 1):
            if k * period >= self.args.minutes * 60:
                break  # no kill at the very end: nothing would show its effect
            if await _wait(stop, k * period - self.now()):
                return
            before = await self.wait_busy(stop)
            t = self.now()
            victim = await asyncio.to_thread(kill_one_replica, self.server, self.rng)
            kill = {"t_s": t, **victim}
            self.kills.append(kill)
            log(f"kill {k}: {victim}")
            if "error" not in victim:
                limit = min(period, 300.0) - 5
                known = {r["replica"] for r in before}
                kill.update(await self.replaced_after(known, t, limit, stop))
                log(f"kill {k}: replica replaced after {kill['replica_replaced_s']} s")

    async def wait_busy(self, stop: asyncio.Event) -> list[dict[str, Any]]:
        """Up to ``BUSY_WAIT_S`` for a moment when every replica has requests running, so that
        the kill (of a replica we cannot tell apart by pid) cuts streams in flight."""
        replicas: list[dict[str, Any]] = []
        for _ in range(int(BUSY_WAIT_S / 0.5)):
            replicas, _ = await self.debug_replicas()
            live = [r for r in replicas if (r["age_s"] or 0) < STALE_S]
            if len(live) >= 2 and all((r["num_requests_running"] or 0) > 0 for r in live):
                break
            if await _wait(stop, 0.5):
                break
        return replicas

    async def replaced_after(
        self, known: set[str], t: float, limit_s: float, stop: asyncio.Event
    ) -> dict[str, Any]:
        """Seconds from the kill until ``/debug/replicas`` shows a replica id not in ``known``
        and two replicas pushing fresh stats (None if not within ``limit_s``); and which
        known replica went quiet (the one killed)."""
        for _ in range(int(limit_s) + 1):  # one look per second
            replicas, _ = await self.debug_replicas()
            fresh = {r["replica"] for r in replicas if (r["age_s"] or 0) < STALE_S}
            if len(fresh) >= 2 and fresh - known:
                return {
                    "replica_replaced_s": self.now() - t,
                    "killed_replica": sorted(known - fresh),
                    "new_replica": sorted(fresh - known),
                }
            if await _wait(stop, 1.0) or self.now() - t > limit_s:
                break
        return {"replica_replaced_s": None}

    # ---- samples ----
    async def sampler(self, stop: asyncio.Event) -> None:
        limit = int(
            (self.args.minutes * 60 + self.args.request_timeout_s + 300) / self.args.sample_s
        )
        for _ in range(limit + 1):
            await self.sample()
            if await _wait(stop, self.args.sample_s):
                return

    async def sample(self) -> None:
        t = self.now()
        rss = await asyncio.to_thread(
            h.ray_rss_mb, self.server, {"ingress": "kvmesh-ingress", "replicas": ":model-"}
        )
        replicas, error = await self.debug_replicas()
        prev = self.samples[-1]["t_s"] if self.samples else 0.0
        done = [o for o in self.outcomes if o.e2e is not None and prev <= o.sent + o.e2e < t]
        self.samples.append(
            {
                "t_s": t,
                "rss_mb": rss,
                "replicas": replicas,
                "debug_error": error,
                "ended": dict(Counter(o.klass for o in done)),  # by class, since the last one
                "in_flight": sum(o.e2e is None for o in self.outcomes),
            }
        )

    async def debug_replicas(self) -> tuple[list[dict[str, Any]], str | None]:
        """``GET /debug/replicas``, flattened to one stats dict per replica."""
        try:
            r = await self.client.get("/debug/replicas", timeout=10)
            if r.status_code != 200:
                return [], f"HTTP {r.status_code}: {r.text[:200]}"
            out = []
            for item in r.json():
                stats = item.get("stats", item)
                out.append(
                    {
                        "replica": item.get("replica"),
                        "age_s": item.get("age_s"),
                        **{
                            k: stats.get(k)
                            for k in (
                                "kv_blocks_free",
                                "kv_blocks_total",
                                "num_requests_running",
                                "num_requests_waiting",
                            )
                        },
                    }
                )
            return out, None
        except (httpx.HTTPError, ValueError) as exc:
            return [], f"{type(exc).__name__}: {exc}"[:200]

    async def wait_idle(self) -> dict[str, Any]:
        """After the traffic: until every live replica (fresh stats) reports nothing running
        or waiting and all its KV blocks free, at most ``--idle-timeout-s``."""
        start = self.now()
        live: list[dict[str, Any]] = []
        for _ in range(int(self.args.idle_timeout_s) + 1):
            replicas, _ = await self.debug_replicas()
            live = [r for r in replicas if (r["age_s"] or 0) < STALE_S]
            if live and all(_idle(r) for r in live):
                return {"idle_after_s": self.now() - start, "kv_all_free": True, "final": live}
            await asyncio.sleep(1.0)
        return {"idle_after_s": None, "kv_all_free": False, "final": live}


def _idle(r: dict[str, Any]) -> bool:
    return (
        r["num_requests_running"] == 0
        and r["num_requests_waiting"] == 0
        and r["kv_blocks_free"] == r["kv_blocks_total"]
    )


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
        return True
    except TimeoutError:
        return False


# ---- the report ---------------------------------------------------------------------------------
def per_minute(outcomes: list[h.Outcome]) -> list[dict[str, Any]]:
    """p99 e2e (finished requests) and TTFT (finished streams), by completion minute."""
    by_min: dict[int, list[h.Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.ok and o.e2e is not None:
            by_min[int((o.sent + o.e2e) // 60)].append(o)
    rows = []
    for minute in sorted(by_min):
        outs = by_min[minute]
        rows.append(
            {
                "minute": minute,
                "finished": len(outs),
                "e2e_p99_ms": h.pct_ms([o.e2e for o in outs])["p99"],
                "ttft_p99_ms": h.pct_ms([o.ttft for o in outs if o.ttft is not None])["p99"],
            }
        )
    return rows


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope, MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 60


def replica_rss_slopes(samples: list[dict[str, Any]], kills: list[dict[str, Any]]) -> list:
    """Replica RSS slope (MB/min) within each stretch between kills, from 30 s after a kill
    (a replacement replica is still loading before that): a kill resets RSS, so one slope
    over the whole run says nothing about leaks."""
    slopes = []
    for lo in [0.0] + [k["t_s"] + 30 for k in kills]:
        kill_at = min((k["t_s"] for k in kills if k["t_s"] > lo), default=math.inf)
        pts = [(s["t_s"], s["rss_mb"]["replicas"]) for s in samples if lo <= s["t_s"] < kill_at]
        slopes.append(slope_per_min(pts))
    return slopes


def kill_effects(soak: Soak) -> None:
    """Per kill: when a request sent after it first finished (``serving_resumed_s``; the other
    replica keeps serving) and first finished on the replacement replica
    (``new_replica_first_ok_s``), and how the requests open at the kill or sent in the 30 s
    after it ended (``around_kill``)."""
    for kill in soak.kills:
        t = kill["t_s"]
        after = [o for o in soak.outcomes if o.sent >= t and o.ok and o.e2e is not None]
        kill["serving_resumed_s"] = min((o.sent + o.e2e - t for o in after), default=None)
        new = set(kill.get("new_replica") or [])
        kill["new_replica_first_ok_s"] = min(
            (o.sent + o.e2e - t for o in after if o.replica in new), default=None
        )
        around = [
            o
            for o in soak.outcomes
            if o.sent < t + 30 and (o.sent >= t or o.e2e is None or o.sent + o.e2e >= t)
        ]
        kill["around_kill"] = dict(Counter(h.classify(o)[1] for o in around))


def report(soak: Soak, run_info: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    outs = soak.outcomes
    classes = Counter(o.klass for o in outs)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outs:
        klass, reason = h.classify(o)
        reasons[klass][reason] += 1
        by_kind[o.kind][klass] += 1
    kill_effects(soak)
    rss = [(s["t_s"], s["rss_mb"]) for s in soak.samples if s["rss_mb"]["total"] > 0]
    groups = ("ingress", "replicas", "other", "total")
    return {
        "benchmark": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **extra,
        "requests": len(outs),
        "classes": dict(classes),
        "zero_lost": classes.get("lost", 0) == 0,
        "reasons": {k: dict(v) for k, v in reasons.items()},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "lost_examples": [_example(o) for o in outs if o.klass == "lost"][:20],
        "unexpected_examples": [_example(o) for o in outs if o.klass == "unexpected"][:20],
        "server_side_clear_error_examples": [  # sheds and cut streams, not the bad requests
            _example(o) for o in outs if o.klass == "clear_error" and not o.kind.startswith("bad_")
        ][:20],
        "kills": soak.kills,
        "kills_done": sum("error" not in k for k in soak.kills),
        "rss_mb": {
            "start": rss[0][1] if rss else None,
            "end": rss[-1][1] if rss else None,
            "slope_mb_per_min": {g: slope_per_min([(t, r[g]) for t, r in rss]) for g in groups},
            "replicas_slope_mb_per_min_between_kills": replica_rss_slopes(soak.samples, soak.kills),
        },
        "p99_per_minute": per_minute(outs),
        "dropped_by_client": run_info["dropped"],
        "cancelled_after_drain": run_info["cancelled"],
        "idle_after_s": run_info["idle_after_s"],
        "kv_all_free": run_info["kv_all_free"],
        "kv_final": run_info["final"],
        "samples": soak.samples,
    }


def _example(o: h.Outcome) -> dict[str, Any]:
    return {
        "kind": o.kind,
        "sent_s": round(o.sent, 2),
        "reason": h.classify(o)[1],
        "status": o.status,
        "detail": o.body_error or o.error_event or o.exception,
        "tokens": o.tokens,
        "e2e_s": None if o.e2e is None else round(o.e2e, 2),
        "replica": o.replica,
    }


def plot(rep: dict[str, Any], path: Path) -> None:
    """Throughput per sample, p99 per minute and RSS over time; kills as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = rep["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ts = [s["t_s"] / 60 for s in samples]
    dts = [
        max(1e-9, b["t_s"] - a["t_s"])
        for a, b in zip([{"t_s": 0.0}, *samples[:-1]], samples, strict=True)
    ]
    for klass in ("finished", "clear_error", "client_disconnect", "unexpected", "lost"):
        rates = [s["ended"].get(klass, 0) / d for s, d in zip(samples, dts, strict=True)]
        if any(rates) or klass in ("finished", "lost"):
            axes[0].plot(ts, rates, label=f"{klass}/s")
    axes[0].set_ylabel("requests/s")
    rows = rep["p99_per_minute"]
    axes[1].plot(
        [r["minute"] + 0.5 for r in rows], [r["e2e_p99_ms"] for r in rows], "o-", label="e2e p99"
    )
    axes[1].plot(
        [r["minute"] + 0.5 for r in rows],
        [r["ttft_p99_ms"] or float("nan") for r in rows],
        "s--",
        label="TTFT p99",
    )
    axes[1].set_ylabel("ms")
    for group in ("ingress", "replicas", "total"):
        axes[2].plot(ts, [s["rss_mb"][group] for s in samples], label=f"RSS {group}")
    axes[2].set_ylabel("MB")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for k in rep["kills"]:
            failed = "error" in k
            ax.axvline(
                k["t_s"] / 60, color="grey" if failed else "r", lw=0.8, ls=":" if failed else "-"
            )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"kvmesh soak: {rep['classes']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every-minutes", type=float, default=5.0, help="0: no kills")
    p.add_argument("--load-fraction", type=float, default=0.8, help="of the measured capacity")
    p.add_argument("--capacity-rps", type=float, default=None, help="skip the measurement")
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-requests", type=int, default=48)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="longer = a hang")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--idle-timeout-s", type=float, default=60.0)
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--plot", default=str(OUT / "soak.png"), help="PNG path ('' for none)")
    p.add_argument("--workdir", default=None, help="config and server log (default: temp)")
    p.add_argument("--requests-jsonl", default=None, help="write every request's outcome here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_interrupt_handlers()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvmesh-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = args.port or h.free_port()
    config = write_config(workdir, port, args.max_model_len)
    server = h.kvmesh_server(port, workdir, replicas=2, config=config)
    log(f"starting kvmesh (2 replicas); config and log in {workdir}")
    with server:
        log(f"ready after {server.ready_after_s:.0f}s; warming up")
        h.warm_up(server.url, MODEL, n=8)
        if args.capacity_rps:
            cap: dict[str, Any] = {"capacity_rps": args.capacity_rps, "given": True}
        else:
            cap = h.measure_capacity(
                server.url,
                MODEL,
                args.input_len,
                args.output_len,
                args.capacity_concurrency,
                args.capacity_requests,
                args.request_timeout_s,
            )
        work_share = 1.0 - MIX["bad"]
        rate = args.load_fraction * cap["capacity_rps"] / work_share
        log(f"capacity {cap['capacity_rps']:.2f} req/s -> {rate:.2f} req/s offered (all kinds)")
        soak = Soak(server, rate, args)
        run_info = asyncio.run(soak.run())
    extra = {
        "args": vars(args),
        "capacity": cap,
        "offered_rps": rate,
        "mix": MIX,
        "server_ready_after_s": server.ready_after_s,
    }
    rep = report(soak, run_info, extra)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rep, Path(args.plot))
        log(f"wrote {args.plot}")
    if args.requests_jsonl:
        with open(args.requests_jsonl, "w") as f:
            for o in soak.outcomes:
                f.write(json.dumps({**o.as_dict(), "class": h.classify(o)}) + "\n")
    text = json.dumps(rep, indent=2, default=str)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    log(
        f"classes {rep['classes']}; zero lost: {rep['zero_lost']}; kills {rep['kills_done']}; "
        f"KV all free: {rep['kv_all_free']}"
    )
    return 0 if rep["zero_lost"] and rep["kv_all_free"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the server was stopped")
        sys.exit(130)
