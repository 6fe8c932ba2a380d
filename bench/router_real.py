"""Real-run router benchmark: SmolLM2 replicas on Ray Serve, seven routers, one workload.

Each router gets a fresh app (fresh replicas, empty caches) and the same scripted workload:

* **tenants**: ``--tenants`` groups, each with its own long system prompt (``--system-tokens``,
  1-4k tokens, spread evenly over the range);
* **sessions**: multi-turn chats that start as a Poisson process (``--session-rate`` per
  second, for ``--window-s`` seconds), each with one tenant's system prompt (tenants drawn
  with Zipf popularity, ``--tenant-zipf``; 0 is uniform) and 2-5 turns.
  Every turn resends the whole conversation plus a new user message, so each prompt extends
  the previous one; a turn is sent when the previous answer has arrived plus a think time
  (exponential, ``--think-s`` mean). The assistant turns in the history are scripted (the same
  text whatever the model said), so every router sees exactly the same prompts.

Prompts are words that are single tokens in SmolLM2's vocabulary, so lengths are exact.
Requests go through ``/v1/chat/completions`` (streamed, ``ignore_eos``, ``--output-tokens``),
with no session header: routers get what an ordinary client sends.

Routers compared, in the same run:

* ``round_robin`` (kvmesh.router.baselines);
* ``power_of_two``: Ray Serve's default ``PowerOfTwoChoicesRequestRouter``;
* ``ray_prefix_affinity``: Ray's ``PrefixCacheAffinityRouter`` loaded without vLLM, with the
  settings Ray's documentation shows (``imbalanced_threshold`` 10, ``match_rate_threshold``
  0.1); it matches on the request's ``prompt`` text, which kvmesh's replica request carries;
* ``prefix_aware``: kvmesh's router with its defaults;
* ``sglang_cache_aware``, ``sglang_power_of_two``: sglang-router 0.3.2 with that policy and
  its defaults (cache-aware: cache threshold 0.3, balance thresholds 64 / 1.5x);
* ``vllm_router_cache_aware``: vllm-router 0.1.17's cache-aware (prefix-tree) policy, defaults.

The peer routers (``bench/router_peers.py``, installed in their own virtual environment) run
as they are deployed: each replica is its own kvmesh server with one replica (an app of its
own under ``/b<i>`` of the same Serve instance, identical replicas), and the peer runs on
loopback in front of them, talking to them directly (``router_peers``: kvmesh accepts the
fields the peers add and answers vllm-router's ``/tokenize`` and sglang-router's
``/get_load``). Their per-replica spread comes from the ``x-kvmesh-replica`` header when the
peer passes it on, else from each backend's ``kvmesh:request_success`` counter; what each peer
asked of the backends is in ``backend_calls`` (from their ``kvmesh:http_requests``).

Reported per router: TTFT p50/p90/p99 and mean, end-to-end latency, request and token
throughput, the prefix-cache hit rate from the replicas' own counters
(``kvmesh:prefix_cache_hits`` / ``kvmesh:prefix_cache_queries`` over the run), how requests
spread over replicas, and errors. ``--kv-blocks`` sizes each replica's KV cache: by default
one replica holds about half the tenants' system prompts, so the fleet only caches them all if
the router partitions tenants (the situation prefix-aware routing exists for: a working set
larger than one replica's cache).

Run on an idle machine; it takes ~5 minutes per router with the defaults:

    .venv/bin/python bench/router_real.py                 # all seven routers
    .venv/bin/python bench/router_real.py --smoke         # a short wiring check
    .venv/bin/python bench/router_real.py --rounds 3 --routers prefix_aware,ray_prefix_affinity
                                                          # repeats, alternated, with medians

Writes bench/out/router_real.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.cluster import loadgen
from kvmesh.cluster.app_config import AppConfig
from kvmesh.cluster.serve_env import apply_serve_process_env
from kvmesh.replicas.engine_args import EngineArgs

sys.path.insert(0, str(Path(__file__).parent))
import router_peers
from serve_bench import free_port

OUT = Path(__file__).parent / "out"
BLOCK = EngineArgs.model_fields["block_size"].default
"""The replicas' KV block size (the engine default, which the app config keeps): the prefix
cache's granularity."""
MODEL = "bench"
PCAR = (
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:"
    "PrefixCacheAffinityRouter"
)
ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "round_robin": ("round_robin", {}),
    "power_of_two": ("power_of_two", {}),
    "ray_prefix_affinity": (PCAR, {"imbalanced_threshold": 10, "match_rate_threshold": 0.1}),
    "prefix_aware": ("prefix_aware", {}),
}
"""Routers inside kvmesh's app (Serve request routers); the peers are ``router_peers.PEERS``."""
ALL_ROUTERS = [*ROUTERS, *router_peers.PEERS]


# ---- the workload ----------------------------------------------------------------------------
def single_token_words(seed: int = 0, limit: int = 4000) -> list[str]:
    """Alphabetic words that SmolLM2's tokenizer encodes as one token each (with their
    leading space), so a text of N of them is N tokens."""
    from tokenizers import Tokenizer

    from kvmesh.replicas.model_files import resolve_model_dir

    tok = Tokenizer.from_file(str(resolve_model_dir(None) / "tokenizer.json"))
    words = sorted(
        t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3
    )
    rng = random.Random(seed)
    rng.shuffle(words)
    chosen = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False).ids) == 1]
    return chosen[:limit]


@dataclass
class Turn:
    user: str
    assistant: str
    """Scripted reply put into the history of the following turns."""


@dataclass
class Session:
    tenant: int
    start_s: float
    turns: list[Turn]
    think_s: list[float]


@dataclass
class Workload:
    system_prompts: list[str]
    sessions: list[Session]


def make_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    words = single_token_words(args.seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    lo, hi = args.system_tokens
    n = args.tenants
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
    systems = [f"Tenant {i} instructions. " + text(length) for i, length in enumerate(lengths)]
    # Zipf popularity: tenant i gets weight 1 / (i + 1)^s (s = 0: uniform). Tenants are
    # ordered by prompt length, so with s > 0 the shortest prompt is the most requested.
    popularity = [1.0 / (i + 1) ** args.tenant_zipf for i in range(n)]
    sessions, t = [], 0.0
    while True:
        t += rng.expovariate(args.session_rate)
        if t > args.window_s:
            break
        turns = [
            Turn(text(rng.randint(*args.user_tokens)), text(rng.randint(*args.user_tokens)))
            for _ in range(rng.randint(*args.turns))
        ]
        think = [rng.expovariate(1.0 / args.think_s) for _ in turns]
        tenant = rng.choices(range(n), weights=popularity)[0]
        sessions.append(Session(tenant, t, turns, think))
    return Workload(systems, sessions)


def system_prompt_tokens(work: Workload) -> list[int]:
    """Each system prompt's length in words (one token each, bar the short header)."""
    return [len(p.split()) for p in work.system_prompts]


# ---- running it --------------------------------------------------------------------------------
@dataclass
class Sent:
    session: int
    turn: int
    tenant: int
    result: loadgen.RequestResult = field(repr=False)


async def run_sessions(
    url: str, work: Workload, output_tokens: int, timeout_s: float
) -> tuple[list[Sent], float]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    sent: list[Sent] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def session(idx: int, s: Session) -> None:
            await asyncio.sleep(max(0.0, s.start_s - (time.perf_counter() - t0)))
            messages: list[dict[str, str]] = [
                {"role": "system", "content": work.system_prompts[s.tenant]}
            ]
            for k, turn in enumerate(s.turns):
                messages.append({"role": "user", "content": turn.user})
                body = {
                    "model": MODEL,
                    "messages": messages,
                    "max_tokens": output_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                result = await loadgen.stream_request(client, "/v1/chat/completions", body)
                sent.append(Sent(idx, k, s.tenant, result))
                if not result.ok:
                    return  # the conversation cannot go on without its answer
                messages.append({"role": "assistant", "content": turn.assistant})
                await asyncio.sleep(s.think_s[k])

        await asyncio.gather(*(session(i, s) for i, s in enumerate(work.sessions)))
        return sent, time.perf_counter() - t0


def metric_sums(
    url: str, families: tuple[str, ...] = ("kvmesh:prefix_cache", "kvmesh:router_")
) -> dict[str, float]:
    """Counter totals from the app's merged ``/metrics`` (replica and router families)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(families):
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                key = s.name
                if "reason" in s.labels:
                    key += f"{{reason={s.labels['reason']}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def app_config(args: argparse.Namespace, router: str, port: int) -> AppConfig:
    base, _, variant = router.partition(":")
    request_router, options = ROUTERS[base]
    if base == "prefix_aware":
        options = {**options, **args.prefix_aware_options, **args.variants.get(variant, {})}
        if variant and (path := options.get("decision_log_path")):
            path = Path(path)  # one log per variant
            options["decision_log_path"] = str(path.with_stem(f"{path.stem}-{variant}"))
    name = "rb-" + router.replace("_", "-").replace(":", "-")
    return _app_config(args, name, port, args.replicas, request_router, options)


def backend_configs(args: argparse.Namespace, router: str, port: int) -> list[AppConfig]:
    """A peer router's backends: one single-replica kvmesh app per replica, each under its own
    route prefix of the one Serve instance (Serve has one HTTP port for all its apps), with
    the same replica settings as the kvmesh routers' app. With one replica the Serve router
    never chooses; the peer does."""
    name = f"rb-{router.replace('_', '-')}"
    return [
        _app_config(args, f"{name}-b{i}", port, 1, "power_of_two", {}, route_prefix=f"/b{i}")
        for i in range(args.replicas)
    ]


def _app_config(
    args: argparse.Namespace,
    name: str,
    port: int,
    replicas: int,
    request_router: str,
    options: dict[str, Any],
    route_prefix: str = "/",
) -> AppConfig:
    return AppConfig.model_validate(
        {
            "name": name,
            "port": port,
            "route_prefix": route_prefix,
            "models": [
                {
                    "name": MODEL,
                    "engine": {
                        "model": args.model,
                        "dtype": "float32",
                        "max_model_len": 8192,
                        "max_num_seqs": 32,
                        "max_num_batched_tokens": args.chunk_tokens,
                        "long_prefill_token_threshold": args.long_prefill_tokens,
                        "num_kv_blocks": args.kv_blocks,
                    },
                    "replicas": replicas,
                    "num_cpus": 0.5,
                    "torch_threads": args.torch_threads,
                    "max_pending_requests": 1024,
                    "max_ongoing_requests": 64,
                    "max_queued_requests": 4096,
                    "graceful_shutdown_timeout_s": 5.0,
                    "request_router": request_router,
                    "router_options": options,
                }
            ],
        }
    )


def warm_up(url: str, replicas: int) -> None:
    """First-call costs (kernel load, allocator) out of the measurement, caches kept clean:
    short prompts no workload prompt starts with. Text, not token ids: Ray's
    PrefixCacheAffinityRouter needs a prompt text and fails requests without one."""
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(4 * replicas):
            r = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": f"Warm-up number {i}.", "max_tokens": 2},
            )
            r.raise_for_status()


def miss_breakdown(sent: list[Sent], system_tokens: list[int]) -> dict[str, Any]:
    """Where each completed request's uncached prompt tokens came from, from what the server
    said it served from cache (router-independent, so peers are comparable):

    * ``system_first``: a tenant's first system-prompt prefill in the run (unavoidable once);
    * ``system_again``: the system prompt prefilled again (a second replica took the tenant,
      or its replica had evicted it);
    * ``history``: the previous turns of the conversation recomputed (evicted, or the turn
      went to another replica);
    * ``new``: the part of the prompt no earlier request sent (never cacheable).

    ``system_tokens`` are the system prompts' word counts: each word is one token, and the
    chat template adds a few, so "the system prompt was cached" means at least that many.
    """
    prompt_of = {(s.session, s.turn): s.result.prompt_tokens for s in sent if s.result.ok}
    seen_tenants: set[int] = set()
    out = {k: {"requests": 0, "tokens": 0} for k in ("system_first", "system_again", "history")}
    new_tokens = 0
    for s in sorted((s for s in sent if s.result.ok), key=lambda s: s.result.start):
        r = s.result
        # Tokens an earlier request already sent: the previous turn's prompt (its answer is
        # scripted text the next turn adds as new), or the system prompt on a first turn.
        known = prompt_of.get((s.session, s.turn - 1), system_tokens[s.tenant])
        known = min(known, r.prompt_tokens - 1)
        new_tokens += r.prompt_tokens - known
        # The cache holds whole blocks only: up to a block of the known part is not a miss.
        missed = max(known // BLOCK * BLOCK - r.cached_tokens, 0)
        if r.cached_tokens < system_tokens[s.tenant] - 2 * BLOCK:
            kind = "system_again" if s.tenant in seen_tenants else "system_first"
        elif missed:
            kind = "history"
        else:
            kind = None
        seen_tenants.add(s.tenant)
        if kind:
            out[kind]["requests"] += 1
            out[kind]["tokens"] += missed
    out["new"] = {"tokens": new_tokens}
    return out


def placement(sent: list[Sent]) -> dict[str, Any]:
    """Where the tenants lived and how often a conversation changed replica.

    ``pairing``: each replica's tenants (a tenant counts where most of its requests went),
    replicas named by first use; ``turns_moved``: turns sent to another replica than the
    conversation's previous turn. Empty when the replicas are unknown (a peer that does not
    pass on ``x-kvmesh-replica``).
    """
    ok = sorted((s for s in sent if s.result.ok and s.result.replica), key=lambda s: s.result.start)
    if not ok:
        return {}
    names: dict[str, int] = {}
    split: dict[int, Counter[int]] = {}
    last: dict[int, str] = {}
    moved = 0
    for s in ok:
        replica = s.result.replica
        index = names.setdefault(replica, len(names))
        split.setdefault(s.tenant, Counter())[index] += 1
        if last.get(s.session, replica) != replica:
            moved += 1
        last[s.session] = replica
    homes: dict[int, list[int]] = {}
    for tenant in sorted(split):
        homes.setdefault(split[tenant].most_common(1)[0][0], []).append(tenant)
    return {
        "pairing": " / ".join(str(homes[r]) for r in sorted(homes, key=lambda r: homes[r])),
        "turns_moved": moved,
        "tenant_split": {
            t: [c.get(i, 0) for i in range(len(names))] for t, c in sorted(split.items())
        },
    }


def request_trace(sent: list[Sent]) -> list[dict[str, Any]]:
    """One row per request, in start order: enough to redo any analysis of the run."""
    t0 = min((s.result.start for s in sent), default=0.0)
    rows = []
    for s in sorted(sent, key=lambda s: s.result.start):
        r = s.result
        rows.append(
            {
                "start_s": round(r.start - t0, 3),
                "session": s.session,
                "turn": s.turn,
                "tenant": s.tenant,
                "ok": r.ok,
                "replica": r.replica,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "ttft_s": None if r.ttft is None else round(r.ttft, 3),
                "error": r.error,
            }
        )
    return rows


def summarize(
    sent: list[Sent],
    duration: float,
    before: dict[str, float],
    after: dict[str, float],
    system_tokens: list[int],
) -> dict[str, Any]:
    results = [s.result for s in sent]
    summary = loadgen.summarize(results, duration)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    queries = delta.get("kvmesh:prefix_cache_queries_total", 0.0)
    hits = delta.get("kvmesh:prefix_cache_hits_total", 0.0)
    ok = [r for r in results if r.ok]
    cached = sum(r.cached_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    summary.update(
        {
            "replica_prefix_hit_rate": hits / queries if queries else None,
            "replica_prefix_queries": queries,
            "request_cached_fraction": cached / prompt if prompt else None,
            "requests_per_replica": dict(Counter(r.replica for r in ok)),
            "router_metrics": {k: v for k, v in delta.items() if k.startswith("kvmesh:router")},
            "first_turn_ttft_ms": loadgen.percentiles(
                [s.result.ttft for s in sent if s.turn == 0 and s.result.ttft is not None]
            ),
            "later_turn_ttft_ms": loadgen.percentiles(
                [s.result.ttft for s in sent if s.turn > 0 and s.result.ttft is not None]
            ),
            "misses": miss_breakdown(sent, system_tokens),
            "placement": placement(sent),
            "trace": request_trace(sent),
        }
    )
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from kvmesh.cluster.app import build_app
    from kvmesh.cluster.serve_cmd import wait_until_ready

    work = make_workload(args)
    n_requests = sum(len(s.turns) for s in work.sessions)
    print(
        f"# workload: {len(work.sessions)} sessions, {n_requests} requests, "
        f"{args.tenants} tenants, system prompts {args.system_tokens} tokens",
        flush=True,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # "local": its own cluster, never one a test or another run left on this machine.
    apply_serve_process_env()  # as `kvmesh serve` starts its cluster
    ray.init(
        address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, Any] = {}
    # Rounds alternate the routers (a b c, a b c, ...) so that a slow spell of the machine
    # falls on every router rather than on one router's repeats.
    order = [
        (router, router if r == 1 else f"{router}{ROUND_MARK}{r}")
        for r in range(1, args.rounds + 1)
        for router in args.routers
    ]
    try:
        for router, key in order:
            if router in router_peers.PEERS:
                runs[key] = run_peer(args, router, key, port, work)
                print(f"{key}: {one_line(runs[key])}", flush=True)
                continue
            config = app_config(args, router, port)
            started = time.perf_counter()
            serve.run(build_app(config), name=config.name, route_prefix="/")
            wait_until_ready(url, timeout_s=600, log=lambda *_: None)
            warm_up(url, args.replicas)
            print(f"# {router}: ready in {time.perf_counter() - started:.0f}s", flush=True)
            before = metric_sums(url)
            sent, duration = asyncio.run(
                run_sessions(url, work, args.output_tokens, args.timeout_s)
            )
            time.sleep(2.5)  # let the replicas push their last counters
            summary = summarize(
                sent, duration, before, metric_sums(url), system_prompt_tokens(work)
            )
            runs[key] = summary
            print(f"{key}: {one_line(summary)}", flush=True)
            serve.delete(config.name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "args": {k: v for k, v in vars(args).items() if k != "routers"},
        "workload": {
            "sessions": len(work.sessions),
            "requests": n_requests,
            "system_prompt_tokens": system_prompt_tokens(work),
            "tenant_of_session": [s.tenant for s in work.sessions],
        },
        "runs": runs,
    }


SUCCESS = "kvmesh:request_success_total"
ROUND_MARK = " #"
"""Run keys: ``router`` for the first round, ``router #k`` for round k."""


def router_of(key: str) -> str:
    return key.partition(ROUND_MARK)[0]


def round_summary(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per router over its rounds: the median and range of TTFT p90 / p99 (ms) and of request
    throughput, and the p90's spread (half the range over the median, the issue's ±)."""
    by_router: dict[str, list[dict[str, Any]]] = {}
    for key, s in runs.items():
        by_router.setdefault(router_of(key), []).append(s)
    out = {}
    for router, summaries in by_router.items():
        row: dict[str, Any] = {"rounds": len(summaries)}
        for name, values in (
            ("p90_ms", [s["ttft_ms"]["p90"] for s in summaries]),
            ("p99_ms", [s["ttft_ms"]["p99"] for s in summaries]),
            ("req_per_s", [s["request_throughput"] for s in summaries]),
        ):
            values = sorted(v for v in values if v is not None)
            if values:
                row[name] = {
                    "median": statistics.median(values),
                    "min": values[0],
                    "max": values[-1],
                }
        if p90 := row.get("p90_ms"):
            row["p90_spread"] = (p90["max"] - p90["min"]) / 2 / p90["median"]
        out[router] = row
    return out


def run_peer(
    args: argparse.Namespace, router: str, key: str, port: int, work: Workload
) -> dict[str, Any]:
    """One peer router in front of fresh single-replica kvmesh backends (fresh replicas, empty
    caches, a fresh router process), all of it torn down afterwards. Its log goes to
    ``<out>_logs/<key>.log`` (``key``: the router and its round)."""
    from ray import serve

    from kvmesh.cluster.app import build_app
    from kvmesh.cluster.serve_cmd import wait_until_ready

    configs = backend_configs(args, router, port)
    backends = [c.url for c in configs]
    out = Path(args.out)
    logs = out.parent / f"{out.name}_logs"  # per output stem: another run's logs stay
    families = ("kvmesh:prefix_cache", "kvmesh:request_success")
    started = time.perf_counter()
    try:
        for c in configs:
            serve.run(build_app(c), name=c.name, route_prefix=c.route_prefix)
        for url in backends:
            wait_until_ready(url, timeout_s=600, log=lambda *_: None)
            warm_up(url, 1)  # each backend directly: the peer's own state starts empty too
        peer_port, metrics_port = free_port(), free_port()
        calls_before = _add_calls(http_calls(b) for b in backends)
        log = logs / f"{key.replace(ROUND_MARK, '_round')}.log"
        # The peer talks to the backends directly: kvmesh takes its requests as they come.
        with router_peers.peer(router, peer_port, metrics_port, backends, log) as url:
            print(f"# {router}: ready in {time.perf_counter() - started:.0f}s", flush=True)
            time.sleep(2.5)  # the warm-up's counters reach /metrics before "before"
            before = [metric_sums(b, families) for b in backends]
            sent, duration = asyncio.run(
                run_sessions(url, work, args.output_tokens, args.timeout_s)
            )
            time.sleep(2.5)  # let the replicas push their last counters
            after = [metric_sums(b, families) for b in backends]
            peer_metrics = router_peers.peer_counters(metrics_port)
            calls = _add_calls(http_calls(b) for b in backends)
            calls.subtract(calls_before)
    finally:
        for c in configs:
            serve.delete(c.name)
    summary = summarize(sent, duration, _add(before), _add(after), system_prompt_tokens(work))
    summary["peer_metrics"] = peer_metrics
    summary["backend_calls"] = {k: v for k, v in sorted(calls.items()) if v}
    if None in summary["requests_per_replica"]:
        # The peer dropped kvmesh's x-kvmesh-replica header: count each backend's finished
        # requests instead (one replica per backend, so a backend is a replica).
        summary["requests_per_replica"] = {
            c.route_prefix: a.get(SUCCESS, 0.0) - b.get(SUCCESS, 0.0)
            for c, b, a in zip(configs, before, after, strict=True)
        }
        summary["requests_per_replica_source"] = f"{SUCCESS} per backend"
    return summary


def http_calls(url: str) -> Counter[str]:
    """The backend's answered HTTP requests, ``"<endpoint> <status>"`` -> count (what the peer
    asked of it: health checks, probes, ``/tokenize``, ``/get_load``, generations)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "kvmesh:http_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['endpoint']} {s.labels['status']}"] += s.value
    return out


def _add_calls(counts) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return total


def _add(sums: list[dict[str, float]]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for s in sums:
        total.update(s)
    return dict(total)


def one_line(s: dict[str, Any]) -> str:
    t = s["ttft_ms"]
    rate = s["replica_prefix_hit_rate"]
    return (
        f"{s['completed']}/{s['requests']} ok | TTFT p50 {_f(t['p50'])} p90 {_f(t['p90'])} "
        f"ms | {s['request_throughput']:.2f} req/s, {s['total_token_throughput']:.0f} tok/s | "
        f"hit rate {'-' if rate is None else f'{rate:.1%}'} | {s['requests_per_replica']}"
    )


def _misses(summary: dict[str, Any], kind: str) -> str:
    m = summary.get("misses", {}).get(kind)
    return "-" if m is None else f"{m['requests']} / {m['tokens']}"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"{report['date']}, {report['cpus']} CPUs, {report['args']['replicas']} replicas x "
        f"{report['args']['torch_threads']} thread(s), KV {report['args']['kv_blocks']} blocks "
        f"per replica, step budget {report['args']['chunk_tokens']} tokens, per-request "
        f"prefill cap {report['args'].get('long_prefill_tokens') or 'none'}, "
        f"tenant Zipf {report['args']['tenant_zipf']}; "
        f"{w['sessions']} sessions / {w['requests']} requests, system prompts "
        f"{w['system_prompt_tokens']} tokens",
        "",
        "| router | ok | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | later turns p90 ms "
        "| req/s | tok/s | replica hit rate | per replica | system prompt again (req / tok) "
        "| history missed (req / tok) | tenants per replica | turns moved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["runs"].items():
        t, later = s["ttft_ms"], s["later_turn_ttft_ms"]
        rate = s["replica_prefix_hit_rate"]
        lines.append(
            f"| {name} | {s['completed']}/{s['requests']} | {_f(t['p50'])} | {_f(t['p90'])} | "
            f"{_f(t['p99'])} | {_f(later['p90'])} | {s['request_throughput']:.2f} | "
            f"{s['total_token_throughput']:.0f} | {'-' if rate is None else f'{rate:.1%}'} | "
            f"{sorted(s['requests_per_replica'].values(), reverse=True)} | "
            f"{_misses(s, 'system_again')} | {_misses(s, 'history')} | "
            f"{s.get('placement', {}).get('pairing', '-')} | "
            f"{s.get('placement', {}).get('turns_moved', '-')} |"
        )
    runs = report["runs"]
    peers = [name for name in runs if name in router_peers.PEERS]
    if peers:
        lines += [
            "",
            f"Peers ({', '.join(peers)}): each replica its own single-replica kvmesh app, the "
            "peer on loopback in front of them, talking to them directly.",
        ]
        for name in peers:
            if source := runs[name].get("requests_per_replica_source"):
                lines.append(f"- {name}: per-replica counts from {source}")
    rounds = report["rounds"]
    if report["args"]["rounds"] > 1:
        lines += [
            "",
            "Over the rounds (median [min-max]; spread = half the range / median):",
            "",
            "| router | rounds | TTFT p90 ms | spread | TTFT p99 ms | req/s |",
            "|---|---|---|---|---|---|",
        ]
        for router, row in rounds.items():
            p90, p99, rps = row.get("p90_ms"), row.get("p99_ms"), row.get("req_per_s")
            lines.append(
                f"| {router} | {row['rounds']} | {_mm(p90, '.0f')} | "
                f"{row.get('p90_spread', 0):.0%} | {_mm(p99, '.0f')} | {_mm(rps, '.2f')} |"
            )
    if "prefix_aware" in rounds:
        ours = rounds["prefix_aware"]
        lines.append("")
        for other in (*router_peers.PEERS, "ray_prefix_affinity", "power_of_two", "round_robin"):
            theirs = rounds.get(other)
            if theirs is None:
                continue
            for metric in ("p90_ms", "p99_ms", "req_per_s"):
                a, b = ours.get(metric), theirs.get(metric)
                if a and b and b["median"]:
                    lines.append(
                        f"- {metric} prefix_aware / {other} (medians): "
                        f"{a['median'] / b['median']:.2f}x"
                    )
    return "\n".join(lines) + "\n"


def _mm(row: dict[str, float] | None, fmt: str) -> str:
    if row is None:
        return "-"
    return f"{row['median']:{fmt}} [{row['min']:{fmt}}-{row['max']:{fmt}}]"


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2)")
    p.add_argument("--routers", default=",".join(ALL_ROUTERS))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--kv-blocks", type=int, default=384, help="per replica, 16 tokens each")
    p.add_argument("--chunk-tokens", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument(
        "--long-prefill-tokens",
        type=int,
        default=0,
        help="long_prefill_token_threshold: one request's prompt tokens per step (0: no cap)",
    )
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument(
        "--tenant-zipf", type=float, default=1.0, help="tenant popularity skew (0 = uniform)"
    )
    p.add_argument("--system-tokens", type=_range, default=(1024, 3072))
    p.add_argument("--user-tokens", type=_range, default=(40, 100))
    p.add_argument("--turns", type=_range, default=(2, 5))
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--session-rate", type=float, default=0.4, help="sessions per second")
    p.add_argument("--think-s", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=150.0, help="sessions start within it")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prefix-aware-options",
        type=json.loads,
        default={},
        help="RouterConfig overrides for kvmesh's router, JSON (e.g. '{\"kv_penalty\": 0}')",
    )
    p.add_argument(
        "--variants",
        type=json.loads,
        default={},
        help="named RouterConfig overrides on top of --prefix-aware-options, each run as "
        "router 'prefix_aware:<name>' (e.g. '{\"flatkv\": {\"kv_penalty_by_miss\": false}}')",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the router list this many times, alternated; the report adds each router's "
        "median and range over its rounds",
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the wiring")
    p.add_argument("--out", default=str(OUT / "router_real"), help="output path stem")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.smoke:
        args.system_tokens, args.tenants, args.window_s = (128, 256), 2, 10.0
        args.session_rate, args.think_s = 0.5, 0.5
        args.out += "_smoke"
    args.routers = args.routers.split(",")
    known = [*ALL_ROUTERS, *(f"prefix_aware:{v}" for v in args.variants)]
    unknown = sorted(set(args.routers) - set(known))
    if unknown:
        p.error(f"unknown routers {unknown}; choose from {ALL_ROUTERS}")
    for router in set(args.routers) & set(router_peers.PEERS):
        router_peers.binary(router)  # installed? Say so now, not after the first runs
    report = run(args)
    report["rounds"] = round_summary(report["runs"])
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: a stem such as "loads_0.1" keeps its ".1".
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(report, indent=2, default=str))
    stem.parent.joinpath(stem.name + ".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
