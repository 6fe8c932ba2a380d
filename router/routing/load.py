"""A replica's load as one router estimates it: the last report plus what it sent since.

Reports are periodic (Serve's ``request_routing_stats_period_s``), so between two of them a
router that only read reports would send a burst of requests to the replica that looked idle.
Each router therefore adds the requests *it* routed that the replica's report does not include
yet. Which those are it learns from the report's ``acks``: the replica echoes the highest
``router_seq`` it has seen from each router (see :meth:`CacheReporter.on_request`). Requests of
other routers show up in the next report; no router needs to hear from another.

A replica that does not acknowledge (older version, request object without the stamp) gets the
fallback: a routed request counts for ``pending_ttl_s``, about the time until a report includes it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, replace

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.wire import LoadReport

_ACKED_BACKSTOP_S = 60.0
"""Even with acks, a request never acknowledged (lost on the way) stops counting after this."""


@dataclass(frozen=True)
class ReplicaLoad:
    """What the policy needs about a replica's load."""

    queued_tokens: float = 0.0
    """Prefill tokens queued ahead of a new request."""
    resident: float = 0.0
    """Requests running or waiting there."""
    kv_usage: float = 0.0
    """Fraction of KV blocks held by running requests (cached free blocks do not count)."""
    prefill_tokens_per_s: float | None = None
    """The replica's measured prefill rate (None: not reported / not yet measured)."""
    decode_step_s: float | None = None
    """The replica's recent decode step time (None: not reported); logged, not priced."""
    recent_work: float = 0.0
    """Prompt tokens this router sent there lately, cached or not (decayed; see RecentWork)."""


@dataclass
class _Pending:
    replica: Hashable
    seq: int
    miss_tokens: int
    routed_at: float
    prompt_tokens: int = 0


@dataclass
class RecentWork:
    """Prompt tokens routed to one replica, decayed with a half-life: its share of traffic.

    Cached tokens count too: a running request holds its whole prompt in the replica's KV
    cache and attends over it every step, and a prefix's later requests (what a placement
    decides) are mostly cached. Counting only the uncached tokens would weigh a tenant's
    one-time first prefill over the many cheap turns that follow it.

    Unlike the queue (which a single long prefill fills and empties within seconds), it
    changes little between two moments a second apart, so decisions made on it come out the
    same when the same requests arrive a little earlier or later.
    """

    half_life_s: float
    value: float = 0.0
    at: float | None = None

    def add(self, work: float, now: float) -> None:
        """Add ``work`` done at ``now`` (a time before the last addition is decayed from then)."""
        if self.at is not None and now < self.at:
            work *= 0.5 ** ((self.at - now) / self.half_life_s)
            now = self.at
        self.value = max(self.at_time(now) + work, 0.0)
        self.at = now

    def at_time(self, now: float) -> float:
        if self.at is None:
            return 0.0
        return self.value * 0.5 ** (max(now - self.at, 0.0) / self.half_life_s)


@dataclass
class _ReplicaLoadState:
    recent: RecentWork
    base: ReplicaLoad = ReplicaLoad()
    """The last report, in the policy's terms."""
    acked: int | None = None
    pending: dict[str, _Pending] = field(default_factory=dict)


class LoadTracker:
    """Per-replica load: reported figures plus this router's unacknowledged requests."""

    def __init__(self, router_id: str, config: RouterConfig) -> None:
        self.router_id = router_id
        self.config = config
        self._replicas: dict[Hashable, _ReplicaLoadState] = {}
        self._where: dict[str, Hashable] = {}

    def add_replica(self, replica: Hashable) -> None:
        if replica not in self._replicas:
            self._replicas[replica] = _ReplicaLoadState(
                RecentWork(self.config.recent_work_half_life_s)
            )

    def remove_replica(self, replica: Hashable) -> None:
        state = self._replicas.pop(replica, None)
        if state is not None:
            for request_id in state.pending:
                self._where.pop(request_id, None)

    def on_report(
        self,
        replica: Hashable,
        load: LoadReport,
        acks: dict[str, int],
        rates: tuple[float | None, float | None] = (None, None),
    ) -> None:
        """``rates``: the replica's measured (prefill tokens per s, decode step s), if any."""
        state = self._replicas.get(replica)
        if state is None:
            return
        if load.pending_prefill_tokens is not None:
            queued = float(load.pending_prefill_tokens)
        else:
            queued = float(load.num_requests_waiting * self.config.waiting_request_tokens)
        resident = float(load.num_requests_running + load.num_requests_waiting)
        state.base = ReplicaLoad(queued, resident, load.kv_cache_usage, *rates)
        acked = acks.get(self.router_id)
        if acked is None:
            return
        state.acked = acked
        done = [rid for rid, p in state.pending.items() if p.seq <= acked]
        for request_id in done:
            del state.pending[request_id]
            self._where.pop(request_id, None)

    def on_routed(
        self,
        replica: Hashable,
        request_id: str,
        seq: int,
        miss_tokens: int,
        now: float,
        prompt_tokens: int = 0,
    ) -> None:
        state = self._replicas.get(replica)
        if state is None:
            return
        # A retry, or a reservation that landed elsewhere: the request leaves its old replica.
        old = self._where.get(request_id)
        if old is not None and (p := self._replicas[old].pending.get(request_id)) is not None:
            self._replicas[old].recent.add(-p.prompt_tokens, p.routed_at)
        self.on_completed(request_id)
        state.pending[request_id] = _Pending(replica, seq, miss_tokens, now, prompt_tokens)
        state.recent.add(prompt_tokens, now)
        self._where[request_id] = replica

    def on_completed(self, request_id: str) -> None:
        replica = self._where.pop(request_id, None)
        if replica is not None and replica in self._replicas:
            self._replicas[replica].pending.pop(request_id, None)

    def load(self, replica: Hashable, now: float) -> ReplicaLoad:
        state = self._replicas.get(replica)
        if state is None:
            return ReplicaLoad()
        base = replace(state.base, recent_work=state.recent.at_time(now))
        if not state.pending:
            return base
        queued, resident = base.queued_tokens, base.resident
        ttl = _ACKED_BACKSTOP_S if state.acked is not None else self.config.pending_ttl_s
        stale = []
        for request_id, p in state.pending.items():
            if now - p.routed_at > ttl:
                stale.append(request_id)
                continue
            queued += p.miss_tokens
            resident += 1
        for request_id in stale:
            del state.pending[request_id]
            self._where.pop(request_id, None)
        return replace(base, queued_tokens=queued, resident=resident)

    def num_pending(self, replica: Hashable | None = None) -> int:
        if replica is None:
            return len(self._where)
        state = self._replicas.get(replica)
        return len(state.pending) if state else 0
