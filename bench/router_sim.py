"""Benchmark 2: routing policies on a simulated cluster, driving the real routing core.

    .venv/bin/python bench/router_sim.py            # 16 and 64 replicas, prints JSON
    .venv/bin/python bench/router_sim.py --quick    # smaller grid, for a smoke test

Each replica is a discrete-event model of a continuous-batching engine with a paged, prefix-
cached KV pool (the same rules as ``replicas/kv``: chained block hashes, LRU of free cached
blocks, a request's tail evicted before its head). Step time comes from a cost model calibrated
on the CPU SmolLM2 engine (flags below)::

    step_ms = decode_ms_base + decode_ms_per_seq * decoding_sequences
            + prefill_ms_per_token * prefill_tokens_in_the_step

with chunked prefill under a per-step token budget, and admission only when the request's
prompt + output blocks fit (no preemption). Workload: tenant groups, each with a long shared
system prompt (1–4k tokens), popular by a Zipf law; conversations arrive as a Poisson process,
and each turn's prompt is the previous prompt + the previous answer + a new user message (the
next turn is sent when the previous answer is complete, after a think time).

Policies (all see the same arrivals):

* ``round_robin``, ``power_of_two`` (fewer outstanding requests of two random replicas);
* ``approx_tree``: SGLang's cache-aware policy: a per-replica prefix tree built only from the
  router's own past decisions (never told about evictions), cache-threshold 0.3, balance-abs 64
  and balance-rel 1.5 on outstanding requests, smallest tree when the match is poor;
* ``oracle``: our cost function with every cache and queue known exactly and instantly;
* ``ours``: :class:`kvmesh.router.routing.PrefixRouterCore`, fed only by the
  ``CacheReporter`` payloads each replica emits every ``--report-period-s`` plus its own
  routing decisions (speculation, acknowledgements) — the code Serve runs.

Ablations (``--policies``): ``ours_4routers`` (four independent routers, as four ingress
replicas, each request to one at random), ``ours_no_speculation``, ``ours_no_acks`` (replicas do
not acknowledge; the router's own requests count for ``pending_ttl_s``), ``ours_queue_limit``,
``ours_eviction_cut`` and ``ours_issue15`` (both): issue #15's opt-in changes,
``queue_soft_limit`` 2048 and ``eviction_aware``; ``ours_no_rate`` (``rate_aware`` off: the
prefill terms in tokens rather than at each replica's reported, measured prefill rate; every
simulated replica has the same cost model, so the measured rates differ only by step mix);
``ours_flat_kv`` (``kv_penalty_by_miss`` off: the whole KV penalty whatever share of the
prompt the replica already holds); ``ours_no_copy`` (``copy_penalty`` 0: copying a prefix
another replica holds costs what any miss does); ``ours_home`` (``prefix_home`` on: a prefix every
replica evicted goes back where it was last routed).

Writes ``bench/out/router_sim.json`` and ``bench/out/router_sim.png`` (TTFT p90 and prefix hit
rate against request rate).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.replicas.block_hash import hash_block_tokens
from kvmesh.replicas.kv.events import BlockRemoved, BlockStored
from kvmesh.router.routing import CacheReporter, PrefixRouterCore, RouterConfig
from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.load import ReplicaLoad
from kvmesh.router.routing.policy import Candidate, decide
from kvmesh.router.routing.wire import block_key

OUT = Path(__file__).parent / "out"
MODEL = "sim"


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    prefill_ms_per_token: float = 1.8
    decode_ms_base: float = 50.0
    decode_ms_per_seq: float = 1.0
    kv_blocks: int = 2900
    block_size: int = 16
    step_tokens: int = 2048
    max_running: int = 128


@dataclass(frozen=True)
class Workload:
    groups_per_replica: float = 4.0
    zipf_s: float = 0.9
    system_tokens: tuple[int, int] = (1000, 4000)
    turns: tuple[int, int] = (2, 8)
    user_tokens: tuple[int, int] = (30, 200)
    output_tokens: tuple[int, int] = (30, 200)
    think_s: float = 5.0
    duration_s: float = 150.0
    warmup_frac: float = 0.4
    """Conversations live ~70 s (5 turns of ~9 s decode + 5 s think): measure after the ramp."""

    @property
    def mean_turns(self) -> float:
        return (self.turns[0] + self.turns[1]) / 2


# ---- requests and conversations ------------------------------------------------------------
@dataclass(eq=False)
class SimRequest:
    rid: str
    conv: Conversation
    arrival: float
    prompt_len: int
    out_len: int
    hashes: list[bytes]
    """Full blocks of the prompt."""
    all_hashes: list[bytes]
    """Full blocks of prompt + answer (what the replica caches by the end)."""
    keys: list[bytes] = field(default_factory=list)
    """Router-side names of ``hashes``."""
    router_id: str | None = None
    router_seq: int = 0
    predicted_hit_tokens: int | None = None
    """What our router expected to be cached (``ours`` only)."""
    est_hit_tokens: int = 0
    """Cached prompt tokens when it reached the replica (for its pending-prefill figure)."""
    replica: int = -1
    hit_tokens: int = 0
    rem_prefill: int = 0
    shared: list[bytes] = field(default_factory=list)
    owned: list[bytes] = field(default_factory=list)
    anon: int = 0
    ttft: float | None = None
    serial: int = field(default_factory=itertools.count().__next__)


class Conversation:
    """One chat: a group's system prompt, then turns that each extend the previous prompt.

    Token ids only need to be distinct (they feed the block hash), so each conversation draws
    them from its own numbered range instead of a random generator.
    """

    def __init__(
        self,
        cid: int,
        system: list[int],
        system_hashes: list[bytes],
        turns: int,
        rng: random.Random,
    ) -> None:
        self.cid = cid
        self.tokens = list(system)
        self.hashes = list(system_hashes)
        self.keys = [block_key(h) for h in system_hashes]
        self.turns_left = turns
        self.rng = rng
        self._next_token = 1_000_000 + cid * 100_000

    def _fresh(self, n: int) -> list[int]:
        start = self._next_token
        self._next_token += n
        return list(range(start, start + n))

    def _extend(self, tokens: list[int], bs: int) -> list[bytes]:
        self.tokens += tokens
        n_full = len(self.tokens) // bs
        parent = self.hashes[-1] if self.hashes else None
        fresh = hash_block_tokens(
            self.tokens[: n_full * bs], bs, (MODEL,), parent=parent, start_block=len(self.hashes)
        )
        self.hashes += fresh
        self.keys += [block_key(h) for h in fresh]
        return self.hashes

    def next_request(self, now: float, wl: Workload, bs: int) -> SimRequest:
        rng = self.rng
        prompt_hashes = list(self._extend(self._fresh(rng.randint(*wl.user_tokens)), bs))
        prompt_keys = list(self.keys)
        prompt_len = len(self.tokens)
        out_len = rng.randint(*wl.output_tokens)
        all_hashes = list(self._extend(self._fresh(out_len), bs))
        self.turns_left -= 1
        rid = f"c{self.cid}-t{self.turns_left}"
        req = SimRequest(rid, self, now, prompt_len, out_len, prompt_hashes, all_hashes)
        req.keys = prompt_keys
        return req


# ---- one replica ---------------------------------------------------------------------------
class SimReplica:
    """Continuous batching over a paged KV pool with prefix caching, stepped in macro-steps.

    A macro-step is ``k`` identical engine steps (same batch, same prefill chunk), so a replica
    costs one event per change of batch rather than one per 50 ms step. An arrival cuts the
    current macro-step at the end of the step in progress.
    """

    def __init__(self, idx: int, cm: CostModel, reporter: CacheReporter | None) -> None:
        self.idx = idx
        self.cm = cm
        self.bs = cm.block_size
        self.reporter = reporter
        self.used = 0
        self.ref: dict[bytes, int] = {}
        self.lru: OrderedDict[bytes, None] = OrderedDict()
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: deque[SimRequest] = deque()
        self.decoding: list[tuple[int, int, SimRequest]] = []
        self.step_no = 0
        self.busy = False
        self.version = 0
        self.macro: tuple[float, float, int, list[tuple[SimRequest, int]]] | None = None
        self.events: list[Any] = []
        self.exact: Oracle | None = None  # told of every cache event at once
        self.acknowledge = True
        self.hits = 0
        self.queries = 0
        self.pending = 0
        """Prompt tokens not yet prefilled (waiting: minus what was cached at arrival)."""
        self.prefill_rate: float | None = None
        """Measured as the engine does (``AsyncLLM._observe_step``): a moving average (weight
        0.2 per step) of prefill tokens / step time over steps with >= 32 prefill tokens."""

    # -- cache ----------------------------------------------------------------------------
    def cached_prefix_blocks(self, req: SimRequest) -> int:
        limit = (req.prompt_len - 1) // self.bs
        n = 0
        for h in req.hashes[:limit]:
            if h in self.ref or h in self.lru:
                n += 1
            else:
                break
        return n

    def _emit(self, event: Any) -> None:
        if self.reporter is not None:
            self.events.append(event)
        if self.exact is not None:
            self.exact.cache_event(
                self.idx, block_key(event.block_hash), isinstance(event, BlockStored)
            )

    def _try_admit(self, req: SimRequest) -> bool:
        hits = self.cached_prefix_blocks(req)
        total = -(-(req.prompt_len + req.out_len) // self.bs)
        need = total - hits
        from_lru = sum(1 for h in req.hashes[:hits] if h not in self.ref)
        if need + from_lru > self.cm.kv_blocks - self.used:
            return False
        for h in req.hashes[:hits]:
            if h in self.ref:
                self.ref[h] += 1
            else:
                del self.lru[h]
                self.ref[h] = 1
                self.used += 1
        while self.cm.kv_blocks - self.used - len(self.lru) < need:
            h, _ = self.lru.popitem(last=False)
            self._emit(BlockRemoved(h))
        self.used += need
        req.shared = req.hashes[:hits]
        req.anon = need
        req.hit_tokens = hits * self.bs
        req.rem_prefill = req.prompt_len - req.hit_tokens
        self.pending += req.est_hit_tokens - req.hit_tokens  # the estimate becomes exact
        self.hits += req.hit_tokens
        self.queries += req.prompt_len
        return True

    def _register(self, req: SimRequest, hashes: list[bytes]) -> None:
        parent = None
        for h in hashes:
            if h not in self.ref and h not in self.lru:
                self.ref[h] = 1
                req.owned.append(h)
                req.anon -= 1
                self._emit(BlockStored(h, parent, self.bs))
            parent = h

    def _release(self, req: SimRequest) -> None:
        # Last block first: the tail is evicted before the prefix other turns share.
        for h in reversed(req.shared + req.owned):
            n = self.ref[h] - 1
            if n:
                self.ref[h] = n
            else:
                del self.ref[h]
                self.lru[h] = None
                self.used -= 1
        self.used -= req.anon

    # -- load, as the engine could report it ----------------------------------------------
    def pending_prefill_tokens(self) -> int:
        return self.pending

    def load_dict(self) -> dict[str, Any]:
        return {
            "num_requests_running": len(self.decoding) + len(self.prefilling),
            "num_requests_waiting": len(self.waiting),
            "kv_cache_usage": self.used / self.cm.kv_blocks,
            "pending_prefill_tokens": self.pending_prefill_tokens(),
            "prefix_cache_queries": self.queries,
            "prefix_cache_hits": self.hits,
            "kv_blocks_total": self.cm.kv_blocks,
        }

    def exact_load(self) -> ReplicaLoad:
        resident = len(self.decoding) + len(self.prefilling) + len(self.waiting)
        return ReplicaLoad(
            self.pending_prefill_tokens(),
            resident,
            self.used / self.cm.kv_blocks,
            kv_blocks_total=self.cm.kv_blocks,
        )

    # -- stepping ---------------------------------------------------------------------------
    def arrive(self, req: SimRequest, now: float) -> float | None:
        """Queue ``req``; returns a new step-end time to schedule, if any."""
        if self.reporter is not None and self.acknowledge:
            self.reporter.on_request(req)
        req.est_hit_tokens = self.cached_prefix_blocks(req) * self.bs
        self.pending += req.prompt_len - req.est_hit_tokens
        self.waiting.append(req)
        if not self.busy:
            return self._plan(now)
        start, step, k, plan = self.macro
        done = int((now - start) / step) + 1
        if done < k:
            self.macro = (start, step, done, plan)
            self.version += 1
            return start + done * step
        return None

    def _plan(self, now: float) -> float | None:
        cm = self.cm
        n_dec = len(self.decoding)
        budget = max(cm.step_tokens - n_dec, 0)
        plan: list[tuple[SimRequest, int]] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            take = min(req.rem_prefill, budget)
            plan.append((req, take))
            budget -= take
        while (
            budget > 0
            and self.waiting
            and n_dec + len(self.prefilling) < cm.max_running
            and self._try_admit(self.waiting[0])
        ):
            req = self.waiting.popleft()
            self.prefilling.append(req)
            take = min(req.rem_prefill, budget)
            plan.append((req, take))
            budget -= take
        k = math.inf
        if len(plan) == 1 and plan[0][0].rem_prefill > plan[0][1]:
            k = plan[0][0].rem_prefill // plan[0][1]
        elif plan:
            k = 1
        if self.decoding:
            k = min(k, self.decoding[0][0] - self.step_no)
        if k == math.inf:
            self.busy = False
            self.macro = None
            return None
        prefill = sum(t for _, t in plan)
        step_ms = (
            cm.decode_ms_base + cm.decode_ms_per_seq * n_dec + cm.prefill_ms_per_token * prefill
        )
        step = step_ms / 1000.0
        self.busy = True
        self.version += 1
        self.macro = (now, step, int(k), plan)
        return now + k * step

    def step_end(self, now: float) -> tuple[list[SimRequest], list[SimRequest], float | None]:
        """Finish the macro-step; returns (first tokens, finished requests, next step end)."""
        _, step, k, plan = self.macro
        self.step_no += k
        prefill = sum(t for _, t in plan)
        if prefill >= 32 and step > 0:
            sample = prefill / step
            old = self.prefill_rate
            # k identical steps of the EWMA at once.
            self.prefill_rate = sample if old is None else sample + (old - sample) * 0.8**k
        first: list[SimRequest] = []
        done: list[SimRequest] = []
        for req, take in plan:
            req.rem_prefill -= take * k
            self.pending -= take * k
            if req.rem_prefill <= 0:
                self.prefilling.remove(req)
                req.ttft = now
                first.append(req)
                self._register(req, req.hashes[len(req.shared) :])
                if req.out_len <= 1:
                    done.append(req)
                else:
                    # Ties by creation order, not id(): runs must be reproducible.
                    heapq.heappush(self.decoding, (self.step_no + req.out_len - 1, req.serial, req))
        while self.decoding and self.decoding[0][0] <= self.step_no:
            done.append(heapq.heappop(self.decoding)[2])
        for req in done:
            self._register(req, req.all_hashes[len(req.hashes) :])
            self._release(req)
        return first, done, self._plan(now)


# ---- policies ------------------------------------------------------------------------------
class Policy:
    name = "base"
    needs_reports = False

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n = n
        self.rng = rng
        self.outstanding = [0] * n

    def route(self, req: SimRequest, now: float) -> int:
        raise NotImplementedError

    def routed(self, req: SimRequest, replica: int, now: float) -> None:
        self.outstanding[replica] += 1

    def finished(self, req: SimRequest, now: float) -> None:
        self.outstanding[req.replica] -= 1

    def prefilled(self, req: SimRequest) -> None:
        pass

    def report(self, replica: int, stats: dict, now: float) -> None:
        pass

    def reasons(self) -> dict[str, int]:
        return {}


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, n, rng):
        super().__init__(n, rng)
        self._next = itertools.cycle(range(n))

    def route(self, req, now):
        return next(self._next)


class PowerOfTwo(Policy):
    name = "power_of_two"

    def route(self, req, now):
        a, b = self.rng.sample(range(self.n), 2)
        return a if self.outstanding[a] <= self.outstanding[b] else b


class ApproxTree(Policy):
    """SGLang-style cache-aware routing on a tree of past decisions (no eviction feedback)."""

    name = "approx_tree"

    def __init__(self, n, rng, block_size, cache_threshold=0.3, balance_abs=64, balance_rel=1.5):
        super().__init__(n, rng)
        self.block_size = block_size
        self.tree = PrefixIndex()
        for i in range(n):
            self.tree.add_replica(i)
        self.size = [0] * n
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    def route(self, req, now):
        lo, hi = min(self.outstanding), max(self.outstanding)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return self.outstanding.index(lo)
        match = self.tree.match(req.keys)
        best = max(match.values())
        if best * self.block_size / max(req.prompt_len, 1) > self.cache_threshold:
            top = [r for r, m in match.items() if m == best]
            return self.rng.choice(top)
        small = min(self.size)
        return self.rng.choice([i for i in range(self.n) if self.size[i] == small])

    def routed(self, req, replica, now):
        super().routed(req, replica, now)
        before = self.tree.num_confirmed(replica)
        for key in req.keys:
            self.tree.store(replica, key)
        self.size[replica] += self.tree.num_confirmed(replica) - before


class Oracle(Policy):
    """Our cost function with exact, instant knowledge of every replica.

    It sees every cache as it is, plus the prompt blocks of requests already sent to each
    replica and not yet prefilled (what that cache is about to hold), and each replica's exact
    queue. It does not know future arrivals, and it makes the same myopic per-request choice.
    """

    name = "oracle"

    def __init__(self, n, rng, config: RouterConfig, replicas: list[SimReplica]):
        super().__init__(n, rng)
        self.config = config
        self.replicas = replicas
        self.index = PrefixIndex()
        for i in range(n):
            self.index.add_replica(i)
        # replica -> key -> [cached?, in-flight prompts holding it]
        self._held: list[dict[bytes, list]] = [{} for _ in range(n)]
        for r in replicas:
            r.exact = self

    def _update(self, replica: int, key: bytes, cached: bool | None, inflight: int) -> None:
        held = self._held[replica]
        entry = held.get(key)
        was = entry is not None and (entry[0] or entry[1] > 0)
        if entry is None:
            entry = held[key] = [False, 0]
        if cached is not None:
            entry[0] = cached
        entry[1] += inflight
        now = entry[0] or entry[1] > 0
        if now and not was:
            self.index.store(replica, key)
        elif was and not now:
            self.index.remove(replica, key)
            del held[key]

    def cache_event(self, replica: int, key: bytes, stored: bool) -> None:
        self._update(replica, key, stored, 0)

    def route(self, req, now):
        match = self.index.match(req.keys)
        cap = max(req.prompt_len - 1, 0)
        bs = self.config.block_size
        cands = [
            Candidate(i, min(match[i] * bs, cap), self.replicas[i].exact_load())
            for i in range(self.n)
        ]
        return decide(req.prompt_len, cands, self.config, self.rng).best

    def routed(self, req, replica, now):
        super().routed(req, replica, now)
        for key in req.keys:
            self._update(replica, key, None, 1)

    def prefilled(self, req):
        for key in req.keys:
            self._update(req.replica, key, None, -1)


class Ours(Policy):
    """The routing core as Serve runs it: reports + its own decisions only.

    ``routers`` > 1 runs that many independent cores, as several ingress replicas would: each
    request goes to one at random, each keeps its own index and speculation, and every core
    reads the same replica reports.
    """

    name = "ours"
    needs_reports = True

    def __init__(self, n, rng, config: RouterConfig, clock, routers: int = 1):
        super().__init__(n, rng)
        self.cores = [
            PrefixRouterCore(config, router_id=f"sim{i}", clock=clock) for i in range(routers)
        ]
        for core in self.cores:
            core.set_replicas(range(n))
        self._pending: dict[str, tuple[PrefixRouterCore, Any]] = {}
        self._reasons: dict[str, int] = {}

    def route(self, req, now):
        core = self.cores[self.rng.randrange(len(self.cores))] if len(self.cores) > 1 else None
        core = core or self.cores[0]
        d = core.route(req.hashes, req.prompt_len)
        self._pending[req.rid] = (core, d)
        self._reasons[d.reason.value] = self._reasons.get(d.reason.value, 0) + 1
        return d.best

    def routed(self, req, replica, now):
        super().routed(req, replica, now)
        core, d = self._pending[req.rid]
        seq = core.next_seq()
        req.router_id, req.router_seq = core.router_id, seq
        req.predicted_hit_tokens = d.hit_tokens.get(replica, 0)
        core.on_routed(replica, req.rid, req.hashes, req.prompt_len, d, seq)

    def finished(self, req, now):
        super().finished(req, now)
        core, _ = self._pending.pop(req.rid)
        core.on_completed(req.rid)

    def report(self, replica, stats, now):
        for core in self.cores:
            core.apply_report(replica, stats)

    def reasons(self):
        return dict(self._reasons)


VARIANTS = {
    "ours": ({}, 1, True),
    "ours_4routers": ({}, 4, True),
    "ours_no_speculation": ({"speculative_ttl_s": 1e-9}, 1, True),
    "ours_no_acks": ({}, 1, False),
    # Issue #15's two opt-in changes (both off by default), alone and together.
    "ours_queue_limit": ({"queue_soft_limit": 2048.0}, 1, True),
    "ours_eviction_cut": ({"eviction_aware": True}, 1, True),
    "ours_issue15": ({"queue_soft_limit": 2048.0, "eviction_aware": True}, 1, True),
    # Tokens, not seconds: the prefill terms not priced at each replica's measured rate.
    "ours_no_rate": ({"rate_aware": False}, 1, True),
    # The flat KV penalty of earlier versions (not scaled by the prompt's uncached share).
    "ours_flat_kv": ({"kv_penalty_by_miss": False}, 1, True),
    # A copy of a prefix another replica holds priced like any miss (no copy_penalty).
    "ours_no_copy": ({"copy_penalty": 0.0}, 1, True),
    # A miss priced the same in a fuller cache (no fill_weight).
    "ours_no_fill": ({"fill_weight": 0.0}, 1, True),
    # A memory of where an evicted prefix was routed (prefix_home, off by default).
    "ours_home": ({"prefix_home": True}, 1, True),
}
"""Ablations of ``ours``: RouterConfig overrides, number of routers, replicas acknowledge."""


# ---- the simulation ------------------------------------------------------------------------
@dataclass
class RunResult:
    policy: str
    rate: float
    requests: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    hit_rate: float
    arrival_rps: float
    """Requests that arrived in the measurement window, per second (closed loop: a slow
    policy delays the next turns, so this falls below the offered rate under overload)."""
    throughput_rps: float
    """Requests completed in the window, per second."""
    reasons: dict[str, int]
    predicted_hit_rate: float | None = None
    """``ours``: the hit rate its index predicted (reported hits are ``hit_rate``)."""


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def simulate(
    policy_name: str,
    n: int,
    rate: float,
    cm: CostModel,
    wl: Workload,
    config: RouterConfig,
    report_period: float,
    seed: int,
) -> RunResult:
    rng = random.Random(seed)
    wrng = random.Random(seed + 1)  # workload: identical across policies
    now = 0.0
    clock = lambda: now  # noqa: E731
    replicas = [SimReplica(i, cm, None) for i in range(n)]
    if policy_name == "round_robin":
        policy: Policy = RoundRobin(n, rng)
    elif policy_name == "power_of_two":
        policy = PowerOfTwo(n, rng)
    elif policy_name == "approx_tree":
        policy = ApproxTree(n, rng, cm.block_size)
    elif policy_name == "oracle":
        policy = Oracle(n, rng, config, replicas)
    elif policy_name in VARIANTS:
        overrides, routers, acks = VARIANTS[policy_name]
        cfg = config.model_copy(update=overrides)
        policy = Ours(n, rng, cfg, clock, routers)
        for r in replicas:
            r.reporter = CacheReporter(block_size=cm.block_size, clock=clock, epoch=f"r{r.idx}")
            r.acknowledge = acks
    else:
        raise ValueError(policy_name)

    # Tenant groups and their system prompts.
    n_groups = max(1, round(wl.groups_per_replica * n))
    systems = []
    for g in range(n_groups):
        toks = list(range(g * 10_000 + 1, g * 10_000 + 1 + wrng.randint(*wl.system_tokens)))
        full = len(toks) // cm.block_size * cm.block_size
        systems.append((toks, hash_block_tokens(toks[:full], cm.block_size, (MODEL,))))
    weights = [1.0 / (g + 1) ** wl.zipf_s for g in range(n_groups)]
    conv_rate = rate / wl.mean_turns
    heap: list[tuple[float, int, str, Any, int]] = []
    order = itertools.count()

    def push(t: float, kind: str, obj: Any, version: int = 0) -> None:
        heapq.heappush(heap, (t, next(order), kind, obj, version))

    t = 0.0
    cid = 0
    while True:
        t += wrng.expovariate(conv_rate)
        if t > wl.duration_s:
            break
        g = wrng.choices(range(n_groups), weights)[0]
        conv = Conversation(cid, *systems[g], wrng.randint(*wl.turns), random.Random(wrng.random()))
        push(t, "turn", conv)
        cid += 1
    live = [cid]  # conversations not finished yet
    if policy.needs_reports:
        for r in replicas:
            push(rng.uniform(0, report_period), "report", r)

    measured: list[SimRequest] = []
    completed_in_window = 0
    warm = wl.warmup_frac * wl.duration_s
    horizon = wl.duration_s * 1.5  # stop even if overloaded queues never drain
    while heap:
        now, _, kind, obj, version = heapq.heappop(heap)
        if now > horizon:
            break
        if kind == "turn":
            req = obj.next_request(now, wl, cm.block_size)
            target = policy.route(req, now)
            req.replica = target
            policy.routed(req, target, now)
            if warm <= now <= wl.duration_s:
                measured.append(req)
            end = replicas[target].arrive(req, now)
            if end is not None:
                push(end, "step", replicas[target], replicas[target].version)
        elif kind == "step":
            rep = obj
            if version != rep.version:
                continue
            first, done, end = rep.step_end(now)
            for req in first:
                policy.prefilled(req)
            for req in done:
                policy.finished(req, now)
                if warm <= now <= wl.duration_s:
                    completed_in_window += 1
                if req.conv.turns_left > 0:
                    push(now + req.conv.rng.expovariate(1.0 / wl.think_s), "turn", req.conv)
                else:
                    live[0] -= 1
            if end is not None:
                push(end, "step", rep, rep.version)
        elif kind == "report":
            rep = obj
            events, rep.events = rep.events, []
            stats = rep.reporter.report(events=events, load=rep.load_dict())
            # Beside the payload, as LLMServer.record_routing_stats reports it (0: not measured).
            stats["prefill_tokens_per_s"] = rep.prefill_rate or 0.0
            policy.report(rep.idx, stats, now)
            if live[0] > 0:
                push(now + report_period, "report", rep)

    # Requests that never got a first token count as infinitely late.
    ttfts = [(r.ttft - r.arrival) if r.ttft is not None else math.inf for r in measured]
    started = [r for r in measured if r.ttft is not None]
    prompt = sum(r.prompt_len for r in started)
    hit = sum(r.hit_tokens for r in started)
    predicted = None
    if prompt and started[0].predicted_hit_tokens is not None:
        predicted = sum(r.predicted_hit_tokens for r in started) / prompt
    window = wl.duration_s - warm
    return RunResult(
        policy_name,
        rate,
        len(measured),
        _pct(ttfts, 0.5),
        _pct(ttfts, 0.9),
        _pct(ttfts, 0.99),
        hit / prompt if prompt else 0.0,
        len(measured) / window,
        completed_in_window / window,
        policy.reasons(),
        predicted,
    )


def rate_at_slo(points: list[RunResult], slo: float) -> float:
    """Highest request rate whose TTFT p90 meets ``slo`` (linear between grid points)."""
    pts = sorted(points, key=lambda p: p.rate)
    best = 0.0
    for lo, hi in itertools.pairwise([None, *pts]):
        if hi.ttft_p90 <= slo:
            best = hi.rate
            continue
        if lo is not None and lo.ttft_p90 <= slo and math.isfinite(hi.ttft_p90):
            frac = (slo - lo.ttft_p90) / (hi.ttft_p90 - lo.ttft_p90)
            best = lo.rate + frac * (hi.rate - lo.rate)
        break
    return best


def plot(results: dict[str, Any], path: Path, slo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 4 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        for name, pts in results[size]["policies"].items():
            rates = [p["rate"] for p in pts]
            axes[row][0].plot(rates, [min(p["ttft_p90"], 1e3) for p in pts], "o-", label=name)
            axes[row][1].plot(rates, [p["hit_rate"] for p in pts], "o-", label=name)
        axes[row][0].axhline(slo, color="grey", ls="--", lw=1, label=f"SLO {slo:g}s")
        axes[row][0].set(
            title=f"{size} replicas: TTFT p90", xlabel="requests/s", ylabel="s", yscale="log"
        )
        axes[row][1].set(
            title=f"{size} replicas: prefix hit rate (tokens)",
            xlabel="requests/s",
            ylim=(0, 1),
        )
        axes[row][0].legend(fontsize=8)
        axes[row][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DEFAULT_RATES = {16: "0.25,0.5,1,1.5,2,2.5", 64: "0.25,0.75,1.5,2.5"}
"""Offered requests/s per replica; the approximate policy crosses the SLO in the low part, the
cache-aware ones near saturation (~1.5 requests/s per replica with this cost model)."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="16,64", help="comma-separated cluster sizes")
    ap.add_argument(
        "--rates-per-replica",
        default=None,
        help="offered requests/s per replica, for every size (default: per size, see code)",
    )
    ap.add_argument("--policies", default="round_robin,power_of_two,approx_tree,oracle,ours")
    ap.add_argument("--prefill-ms-per-token", type=float, default=1.8)
    ap.add_argument("--decode-ms-base", type=float, default=50.0)
    ap.add_argument("--decode-ms-per-seq", type=float, default=1.0)
    ap.add_argument("--kv-blocks", type=int, default=2900, help="KV blocks per replica")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--groups-per-replica", type=float, default=4.0)
    ap.add_argument("--zipf", type=float, default=0.9, help="tenant popularity exponent")
    ap.add_argument("--duration-s", type=float, default=150.0, help="arrival window")
    ap.add_argument("--think-s", type=float, default=5.0)
    ap.add_argument("--report-period-s", type=float, default=1.0)
    ap.add_argument("--ttft-slo-s", type=float, default=5.0, help="p90 TTFT target")
    ap.add_argument(
        "--stop-p90-s",
        type=float,
        default=60.0,
        help="skip a policy's higher rates once its TTFT p90 passes this (saves time)",
    )
    ap.add_argument("--router-config", default="{}", help="JSON overrides of RouterConfig")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        help="worker processes (one policy and cluster size each)",
    )
    ap.add_argument("--quick", action="store_true", help="16 replicas, 3 rates, 90 s")
    ap.add_argument("--out", type=Path, default=OUT / "router_sim")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.replicas.split(",")]
    duration = args.duration_s
    if args.quick:
        sizes, args.rates_per_replica, duration = [16], "0.5,1,2", 90.0
    cm = CostModel(
        args.prefill_ms_per_token,
        args.decode_ms_base,
        args.decode_ms_per_seq,
        args.kv_blocks,
        args.block_size,
        args.step_tokens,
    )
    wl = Workload(
        groups_per_replica=args.groups_per_replica,
        zipf_s=args.zipf,
        think_s=args.think_s,
        duration_s=duration,
    )
    overrides = json.loads(args.router_config)
    config = RouterConfig(block_size=args.block_size, seed=args.seed, **overrides)
    policies = args.policies.split(",")
    slos = sorted({2.0, args.ttft_slo_s, 8.0})

    t0 = time.perf_counter()
    tasks = []
    for n in sizes:
        rates = [
            float(r) * n
            for r in (args.rates_per_replica or DEFAULT_RATES.get(n, DEFAULT_RATES[16])).split(",")
        ]
        tasks += [
            (name, n, rates, cm, wl, config, args.report_period_s, args.seed, args.stop_p90_s)
            for name in policies
        ]
    # Costliest first, so the pool is not left waiting on one long task at the end.
    tasks.sort(key=lambda t: (t[1], t[0] not in ("round_robin", "power_of_two")), reverse=True)
    jobs = max(1, args.jobs)
    if jobs == 1:
        runs = [_sweep(*t) for t in tasks]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            runs = list(pool.map(_sweep, *zip(*tasks, strict=True)))
    results: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for n in sizes:
        per_policy = {
            name: next(r for t, r in zip(tasks, runs, strict=True) if t[:2] == (name, n))
            for name in policies
        }
        results[str(n)] = {
            "policies": {name: [vars(r) for r in rs] for name, rs in per_policy.items()}
        }
        summary[str(n)] = _summarise(per_policy, slos, args.ttft_slo_s)
    elapsed = time.perf_counter() - t0

    out = {
        "command": " ".join(["bench/router_sim.py", *(argv if argv is not None else sys.argv[1:])]),
        "cost_model": vars(cm),
        "workload": dict(vars(wl)),
        "router_config": config.model_dump(),
        "report_period_s": args.report_period_s,
        "ttft_slo_s": args.ttft_slo_s,
        "summary": summary,
        "results": results,
        "elapsed_s": round(elapsed, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = _finite(out)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(results, args.out.with_suffix(".png"), args.ttft_slo_s)
    print(json.dumps(out, indent=1))
    return out


def _sweep(
    name: str,
    n: int,
    rates: list[float],
    cm: CostModel,
    wl: Workload,
    config: RouterConfig,
    report_period: float,
    seed: int,
    stop_p90: float,
) -> list[RunResult]:
    """One policy over increasing rates, stopping once it is hopelessly overloaded."""
    out = []
    for rate in rates:
        run = simulate(name, n, rate, cm, wl, config, report_period, seed)
        out.append(run)
        if not run.ttft_p90 <= stop_p90:
            break
    return out


def _summarise(
    per_policy: dict[str, list[RunResult]], slos: list[float], slo: float
) -> dict[str, Any]:
    """Rate each policy sustains at each SLO, and the two target ratios."""
    s: dict[str, Any] = {
        f"rate_at_p90_ttft_{x:g}s": {
            name: round(rate_at_slo(runs, x), 2) for name, runs in per_policy.items()
        }
        for x in slos
    }
    s["meets_slo_at_top_rate"] = [
        name for name, runs in per_policy.items() if runs and runs[-1].ttft_p90 <= slo
    ]  # for these, the rate at the SLO is only a lower bound (the grid ends first)
    at_slo = s[f"rate_at_p90_ttft_{slo:g}s"]
    if at_slo.get("ours") is not None and at_slo.get("approx_tree"):
        s["ours_vs_approx_at_slo"] = round(at_slo["ours"] / at_slo["approx_tree"], 2)
    if "ours" in per_policy and "oracle" in per_policy:
        pairs = list(zip(per_policy["ours"], per_policy["oracle"], strict=False))
        within = [(o, x) for o, x in pairs if x.ttft_p90 <= slo and x.hit_rate > 0]
        if within:
            s["hit_rate_vs_oracle_within_slo_min"] = round(
                min(o.hit_rate / x.hit_rate for o, x in within), 3
            )
        if pairs:
            s["hit_rate_vs_oracle_all_rates_min"] = round(
                min(o.hit_rate / x.hit_rate for o, x in pairs if x.hit_rate > 0), 3
            )
    return s


def _finite(x: Any) -> Any:
    """JSON without Infinity/NaN: a p90 that never arrived is null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
