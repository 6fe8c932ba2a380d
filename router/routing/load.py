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
    kv_blocks_total: int = 0
    """The replica's KV cache size in blocks (0: not reported)."""


@dataclass
class _Pending:
    replica: Hashable
    seq: int
    miss_tokens: int
    routed_at: float


@dataclass
class _ReplicaLoadState:
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
        self._replicas.setdefault(replica, _ReplicaLoadState())

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
        state.base = ReplicaLoad(
            queued, resident, load.kv_cache_usage, *rates, load.kv_blocks_total or 0
        )
        acked = acks.get(self.router_id)
        if acked is None:
            return
        state.acked = acked
        done = [rid for rid, p in state.pending.items() if p.seq <= acked]
        for request_id in done:
            del state.pending[request_id]
            self._where.pop(request_id, None)

    def on_routed(
        self, replica: Hashable, request_id: str, seq: int, miss_tokens: int, now: float
    ) -> None:
        state = self._replicas.get(replica)
        if state is None:
            return
        self.on_completed(request_id)  # a retry re-routes the same request
        state.pending[request_id] = _Pending(replica, seq, miss_tokens, now)
        self._where[request_id] = replica

    def on_completed(self, request_id: str) -> None:
        replica = self._where.pop(request_id, None)
        if replica is not None and replica in self._replicas:
            self._replicas[replica].pending.pop(request_id, None)

    def load(self, replica: Hashable, now: float) -> ReplicaLoad:
        state = self._replicas.get(replica)
        if state is None:
            return ReplicaLoad()
        base = state.base
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
