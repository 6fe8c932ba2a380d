"""Cache-blind request routers, as baselines for the prefix-aware one.

Serve ships power of two choices (its default) but no round robin; this is the plain version
(``request_router: round_robin`` in a kvmesh config). It is also what many cluster load
balancers (Kubernetes Services, simple proxies) do, which makes it the floor to compare with.
"""

from __future__ import annotations

import itertools
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRequestRouter(RequestRouter):
    """Each request to the next replica in a fixed order, skipping to the following ones
    when it is full (Serve tries the ranks in order)."""

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"round robin takes no options, got {sorted(kwargs)}")
        self._counter = itertools.count()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not hasattr(self, "_counter"):  # constructed without initialize_state (tests)
            self.initialize_state()
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = next(self._counter) % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
