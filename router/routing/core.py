"""The prefix-aware router, without Ray: one instance per routing process.

Ray Serve's ``RequestRouter`` (:mod:`kvmesh.router.request_router`) and the simulator
(``bench/router_sim.py``) both drive this class, so what the simulation measures is this code.

Lifecycle of a request::

    decision = core.route(block_hashes, num_prompt_tokens, session_id=...)   # rank replicas
    seq = core.next_seq()           # stamp for the replica to acknowledge (optional)
    ... the transport sends it to some replica R (normally decision.best) ...
    # R is now expected to hold the prompt's blocks (speculation) and to carry its load
    core.on_routed(R, request_id, block_hashes, num_prompt_tokens, decision, seq, session_id)
    ... later ...
    core.on_completed(request_id)

and, whenever a replica's ``record_routing_stats`` dict arrives, ``core.apply_report(R, stats)``.
Several instances (one per ingress replica) route independently; each keeps its own index,
corrected from the same reports, and there is no shared state on the request path.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.homes import PrefixHomes
from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.load import LoadTracker
from kvmesh.router.routing.metrics import RouterMetrics
from kvmesh.router.routing.policy import Candidate, Decision, Reason, decide
from kvmesh.router.routing.sync import ReplicaSync, SyncOutcome, apply_report
from kvmesh.router.routing.wire import block_key, parse_rates, parse_report

log = logging.getLogger(__name__)

_PIN_BACKSTOP_S = 300.0
"""A request whose completion we never heard of stops pinning its prefix after this."""


class PrefixRouterCore:
    """Prefix index + load estimates + policy, for one routing process."""

    def __init__(
        self,
        config: RouterConfig | None = None,
        *,
        router_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config or RouterConfig()
        self.router_id = router_id or secrets.token_hex(6)
        self._clock = clock
        self._metrics = metrics
        self._rng = random.Random(self.config.seed)
        self._lock = threading.RLock()
        self.index = PrefixIndex()
        self.homes = PrefixHomes(self.config.prefix_home_blocks)
        self.loads = LoadTracker(self.router_id, self.config)
        self._sync: dict[Hashable, ReplicaSync] = {}
        self._hit_counters: dict[Hashable, tuple[int, int]] = {}
        self._last_stats: dict[Hashable, Mapping[str, Any]] = {}
        self._unhealthy: set[Hashable] = set()
        self._sessions: OrderedDict[str, tuple[Hashable, float]] = OrderedDict()
        # request_id -> (replica, prompt keys, routed at): our requests in flight, whose
        # prefix blocks their replica will not evict (see PrefixIndex.pin).
        self._pins: OrderedDict[str, tuple[Hashable, Sequence[bytes], float]] = OrderedDict()
        self._seq = 0
        self._warned_block_size = False

    # ---- replica set --------------------------------------------------------------------
    def add_replica(self, replica: Hashable) -> None:
        with self._lock:
            if replica in self._sync:
                return
            self.index.add_replica(replica)
            self.loads.add_replica(replica)
            self._sync[replica] = ReplicaSync()

    def remove_replica(self, replica: Hashable) -> None:
        """Forget a replica that died or left; its sessions re-route on their next turn."""
        with self._lock:
            if self._sync.pop(replica, None) is None:
                return
            self.index.remove_replica(replica)
            self.homes.forget_replica(replica)
            self.loads.remove_replica(replica)
            self._hit_counters.pop(replica, None)
            self._last_stats.pop(replica, None)
            for request_id in [k for k, v in self._pins.items() if v[0] == replica]:
                del self._pins[request_id]
            self._unhealthy.discard(replica)

    def set_replicas(self, replicas: Iterable[Hashable]) -> None:
        wanted = set(replicas)
        with self._lock:
            for gone in [r for r in self._sync if r not in wanted]:
                self.remove_replica(gone)
            for new in wanted:
                self.add_replica(new)

    @property
    def replicas(self) -> list[Hashable]:
        return list(self._sync)

    # ---- reports ------------------------------------------------------------------------
    def apply_report(self, replica: Hashable, routing_stats: Mapping[str, Any] | None) -> bool:
        """Fold in a replica's latest ``record_routing_stats`` dict; False if it has no report.

        A replica that reports ``healthy: 0`` (its engine died or stalled) takes no new
        requests until it reports healthy again or Serve replaces it.
        """
        with self._lock:
            if routing_stats is not None and routing_stats.get("healthy", 1) == 0:
                self._unhealthy.add(replica)
            else:
                self._unhealthy.discard(replica)
            # Serve re-broadcasts every replica's dict when any one changes: skip the others.
            if replica in self._sync and routing_stats == self._last_stats.get(replica):
                return True
        report = parse_report(routing_stats)
        if report is None:
            return False
        with self._lock:
            state = self._sync.get(replica)
            if state is None:
                return False
            self._last_stats[replica] = routing_stats
            if report.block_size != self.config.block_size and not self._warned_block_size:
                self._warned_block_size = True
                log.warning(
                    "replica %s reports block_size %d but the router uses %d: prefixes will "
                    "not match (set RouterConfig.block_size to the engine's)",
                    replica,
                    report.block_size,
                    self.config.block_size,
                )
            was_synced = state.synced
            outcome = apply_report(self.index, replica, state, report)
            self.loads.on_report(replica, report.load, report.acks, parse_rates(routing_stats))
            self._count_reported_hits(replica, report.load)
            if self._metrics is not None:
                if outcome is SyncOutcome.RESYNC:
                    self._metrics.resyncs.inc()
                elif outcome is SyncOutcome.GAP and was_synced:
                    self._metrics.gaps.inc()
            return True

    def _count_reported_hits(self, replica: Hashable, load: Any) -> None:
        if load.prefix_cache_queries is None or load.prefix_cache_hits is None:
            return
        now = (load.prefix_cache_queries, load.prefix_cache_hits)
        before = self._hit_counters.get(replica)
        self._hit_counters[replica] = now
        if before is None or self._metrics is None:
            return
        dq, dh = now[0] - before[0], now[1] - before[1]
        if dq >= 0 and dh >= 0:  # counters reset when the engine restarts
            self._metrics.reported_query_tokens.inc(dq)
            self._metrics.reported_hit_tokens.inc(dh)

    def is_synced(self, replica: Hashable) -> bool:
        state = self._sync.get(replica)
        return bool(state and state.synced)

    # ---- routing ------------------------------------------------------------------------
    def route(
        self,
        block_hashes: Sequence[bytes],
        num_prompt_tokens: int,
        *,
        session_id: str | None = None,
        candidates: Iterable[Hashable] | None = None,
    ) -> Decision:
        """Rank the candidate replicas (default: all known) for one request."""
        bs = self.config.block_size
        with self._lock:
            now = self._clock()
            self.index.expire(now)
            self._expire_pins(now)
            pool = list(self._sync) if candidates is None else list(candidates)
            # Never an unhealthy replica while a healthy one is left.
            pool = [r for r in pool if r not in self._unhealthy] or pool
            for replica in pool:
                if replica not in self._sync:
                    self.add_replica(replica)
            keys = [block_key(h) for h in block_hashes]
            matched = self.index.match(keys, pool)
            homes = self.homes.home_blocks(keys) if self.config.prefix_home else {}
            # The engine always computes the prompt's last token, so a fully cached prompt
            # still leaves one token of prefill.
            cap = max(num_prompt_tokens - 1, 0)
            cands = []
            for r in pool:
                load = self.loads.load(r, now)
                n = matched[r]
                reported = None
                if self.config.eviction_aware and n:
                    reported = min(n * bs, cap)
                    n = self.index.surviving(
                        r, keys, n, load.queued_tokens / bs, self.config.eviction_horizon
                    )
                cached = self.index.num_confirmed(r) + self.index.num_speculative(r)
                home = min(homes.get(r, 0) * bs, cap)
                cands.append(Candidate(r, min(n * bs, cap), load, reported, cached, home))
            sticky = self._sticky(session_id, now)
            decision = decide(num_prompt_tokens, cands, self.config, self._rng, sticky)
            return replace(decision, keys=keys)

    def next_seq(self) -> int:
        """A fresh stamp for a request this router is about to send."""
        with self._lock:
            self._seq += 1
            return self._seq

    def on_routed(
        self,
        replica: Hashable,
        request_id: str,
        block_hashes: Sequence[bytes],
        num_prompt_tokens: int,
        decision: Decision | None,
        seq: int = 0,
        session_id: str | None = None,
        reserved: Hashable | None = None,
    ) -> None:
        """The request went to ``replica``: expect its blocks there, count its load.

        ``reserved``: where :meth:`reserve` already put it; landing there needs no new entries.
        """
        with self._lock:
            if replica not in self._sync:
                return
            now = self._clock()
            if replica == reserved and decision is not None:
                hit = decision.hit_tokens.get(replica, 0)
            else:
                hit = self._expect(
                    replica, request_id, block_hashes, num_prompt_tokens, decision, seq
                )
            if session_id and self.config.session_affinity:
                self._remember_session(session_id, replica, now)
            if self.config.prefix_home:
                self.homes.record(replica, _keys_of(decision, block_hashes))
            if self._metrics is not None:
                reason = decision.reason.value if decision is not None else Reason.NO_PREFIX.value
                self._metrics.decision(reason)
                self._metrics.prompt_tokens.inc(num_prompt_tokens)
                self._metrics.predicted_hit_tokens.inc(hit)
                self._metrics.index_speculative.set(self.index.num_speculative())
                self._metrics.index_confirmed.set(
                    sum(self.index.num_confirmed(r) for r in self._sync)
                )

    def reserve(
        self,
        replica: Hashable,
        request_id: str,
        block_hashes: Sequence[bytes],
        num_prompt_tokens: int,
        decision: Decision,
        seq: int = 0,
    ) -> None:
        """Expect the request on the replica it was ranked first for, as soon as it is decided.

        Serve may ask for a burst of decisions before it confirms any of them; without this,
        every request of the burst sees the same idle replica. ``on_routed`` later moves the
        load (and adds speculative blocks) wherever the request actually went.
        """
        with self._lock:
            if replica in self._sync:
                self._expect(replica, request_id, block_hashes, num_prompt_tokens, decision, seq)

    def _expect(
        self,
        replica: Hashable,
        request_id: str,
        block_hashes: Sequence[bytes],
        num_prompt_tokens: int,
        decision: Decision | None,
        seq: int,
    ) -> int:
        """Speculative cache entries and load for a request on ``replica``; its hit tokens."""
        now = self._clock()
        hit = decision.hit_tokens.get(replica, 0) if decision is not None else 0
        keys = _keys_of(decision, block_hashes)
        self.index.speculate(replica, keys, now, self.config.speculative_ttl_s)
        self.loads.on_routed(replica, request_id, seq, num_prompt_tokens - hit, now)
        self._unpin(request_id, released=False)  # a retry, or Serve chose another replica
        if keys:
            self.index.touch(replica, keys)
            self.index.pin(replica, keys, +1)
            self._pins[request_id] = (replica, keys, now)
        return hit

    def _unpin(self, request_id: str, *, released: bool) -> None:
        entry = self._pins.pop(request_id, None)
        if entry is None:
            return
        replica, keys, _ = entry
        self.index.pin(replica, keys, -1)
        if released:
            # A finished request's blocks go to the tail of the replica's LRU.
            self.index.touch(replica, keys)

    def _expire_pins(self, now: float) -> None:
        pins = self._pins
        while pins:
            request_id, (_, _, routed_at) = next(iter(pins.items()))
            if now - routed_at <= _PIN_BACKSTOP_S:
                break
            self._unpin(request_id, released=False)

    def on_completed(self, request_id: str) -> None:
        with self._lock:
            self.loads.on_completed(request_id)
            self._unpin(request_id, released=True)

    # ---- sessions -----------------------------------------------------------------------
    def _sticky(self, session_id: str | None, now: float) -> Hashable | None:
        if not session_id or not self.config.session_affinity:
            return None
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        replica, seen = entry
        if now - seen > self.config.session_ttl_s or replica not in self._sync:
            del self._sessions[session_id]
            return None
        return replica

    def _remember_session(self, session_id: str, replica: Hashable, now: float) -> None:
        self._sessions[session_id] = (replica, now)
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)


def _keys_of(decision: Decision | None, block_hashes: Sequence[bytes]) -> Sequence[bytes]:
    """The prompt's block keys: the ones ``route`` computed, unless the caller routed it
    without a decision for these hashes."""
    if decision is not None and len(decision.keys) == len(block_hashes):
        return decision.keys
    return [block_key(h) for h in block_hashes]
