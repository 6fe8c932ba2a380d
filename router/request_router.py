"""Ray Serve ``RequestRouter`` that sends each request where its prompt prefix is cached.

Configure it on the *model* deployment (the one the ingress calls through a handle)::

    from ray.serve.config import RequestRouterConfig

    @serve.deployment(
        request_router_config=RequestRouterConfig(
            request_router_class="kvmesh.router.request_router:PrefixAwareRequestRouter",
            request_router_kwargs={"block_size": 16, "model_name": "smollm2"},  # RouterConfig
            request_routing_stats_period_s=1.0,
            request_routing_stats_timeout_s=5.0,
        ),
    )
    class ModelReplica: ...  # returns CacheReporter.report(...) from record_routing_stats

The router lives in the process holding the handle (each ingress replica has its own) and runs
:class:`~kvmesh.router.routing.core.PrefixRouterCore`:

* ``choose_replicas`` finds the request's block hashes in the handle call's arguments
  (:mod:`kvmesh.router.routing.hint`), ranks every candidate, stamps the request object with
  this router's id and a sequence number, and answers ``[[best], [second], [the rest]]``; Serve
  takes the first rank whose replica has room (``max_ongoing_requests``), so a full best replica
  degrades to the next one instead of queueing;
* ``on_request_routed`` (the replica accepted it) records the speculative cache entries and the
  request's load; ``on_request_completed`` releases the load;
* ``update_replicas`` (every long-poll broadcast, which is also how new routing stats arrive)
  adds and removes replicas and applies each replica's latest report;
  ``on_replica_actor_died`` forgets a dead replica at once.

Calls without block hashes are routed by load alone (reason ``no_prefix``). Serve's
``on_request_routed`` is only called when replicas can reject (the default outside Ray Client);
without it the router learns a request's blocks from the replica's next report instead.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray.serve._private.constants import SERVE_LOGGER_NAME
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvmesh.router.routing import decision_log
from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.core import PrefixRouterCore
from kvmesh.router.routing.hint import RouteInputs, find_route_inputs, stamp
from kvmesh.router.routing.metrics import RouterMetrics
from kvmesh.router.routing.policy import Decision

logger = logging.getLogger(SERVE_LOGGER_NAME)

_MAX_IN_FLIGHT_DECISIONS = 65_536
"""Decisions waiting for ``on_request_routed``; requests cancelled before routing leave theirs."""


@dataclass
class _Routed:
    decision: Decision
    inputs: RouteInputs | None
    seq: int
    session_id: str | None


class PrefixAwareRequestRouter(RequestRouter):
    """Prefix-cache- and load-aware routing for kvmesh model replicas."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Serve with the deployment's ``request_router_kwargs`` (a RouterConfig)."""
        self.routing_config = RouterConfig(**kwargs)
        self.core = PrefixRouterCore(
            self.routing_config, metrics=RouterMetrics(self.routing_config.model_name)
        )
        self._decisions: OrderedDict[str, _Routed] = OrderedDict()
        self.decision_log = decision_log.open_log(self.routing_config)

    def _ensure_core(self) -> PrefixRouterCore:
        # Serve always calls initialize_state; this keeps direct construction (tests) working.
        if not hasattr(self, "core"):
            self.initialize_state()
        return self.core

    # ---- routing ------------------------------------------------------------------------
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        core = self._ensure_core()
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        inputs = None
        session_id = None
        if pending_request is not None:
            inputs = find_route_inputs(
                pending_request.args, pending_request.kwargs, self.routing_config.block_size
            )
            session_id = (inputs.session_id if inputs else None) or (
                pending_request.metadata.session_id or None
            )
        decision = core.route(
            inputs.block_hashes if inputs else (),
            inputs.num_prompt_tokens if inputs else 0,
            session_id=session_id,
            candidates=by_id,
        )
        if pending_request is not None:
            seq = core.next_seq()
            if inputs is not None:
                stamp(inputs.carrier, core.router_id, seq)
            key = pending_request.metadata.internal_request_id
            if key not in self._decisions:
                pending_request.future.add_done_callback(
                    functools.partial(self._release_if_cancelled, key)
                )
            self._decisions[key] = _Routed(decision, inputs, seq, session_id)
            if self.decision_log is not None:
                self._log_decision(key, decision, inputs, session_id)
            core.reserve(
                decision.best,
                key,
                inputs.block_hashes if inputs else (),
                inputs.num_prompt_tokens if inputs else 0,
                decision,
                seq,
            )
            self._decisions.move_to_end(key)
            while len(self._decisions) > _MAX_IN_FLIGHT_DECISIONS:
                self._decisions.popitem(last=False)
        ranked = [by_id[r] for r in decision.ranked]
        return [[r] for r in ranked[:2]] + ([ranked[2:]] if len(ranked) > 2 else [])

    def _log_decision(self, key: str, decision: Decision, inputs, session_id) -> None:
        # Logged under kvmesh's request id (the ingress reports the outcome under it).
        request_id = getattr(inputs.carrier, "request_id", None) if inputs else None
        self.decision_log.record(
            request_id or key,
            decision,
            inputs.num_prompt_tokens if inputs else 0,
            session_id=session_id,
            sticky=decision.sticky,
        )

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        core = self._ensure_core()
        request_id = pending_request.metadata.internal_request_id
        routed = self._decisions.pop(request_id, None)
        if routed is None:
            return
        inputs = routed.inputs
        if self.decision_log is not None:
            logged_id = getattr(inputs.carrier, "request_id", None) if inputs else None
            self.decision_log.set_chosen(logged_id or request_id, replica_id.unique_id)
        core.on_routed(
            replica_id.unique_id,
            request_id,
            inputs.block_hashes if inputs else (),
            inputs.num_prompt_tokens if inputs else 0,
            routed.decision,
            routed.seq,
            routed.session_id,
            reserved=routed.decision.best,
        )

    def _release_if_cancelled(self, request_id: str, future: Any) -> None:
        """A request cancelled before Serve sent it (its caller left) never reaches a replica,
        so no replica will acknowledge it: drop its reservation rather than count it as load
        until the backstop expires (which steered every request elsewhere meanwhile)."""
        if future.cancelled() and self._decisions.pop(request_id, None) is not None:
            self._ensure_core().on_completed(request_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._decisions.pop(internal_request_id, None)
        self._ensure_core().on_completed(internal_request_id)

    # ---- replica set and reports --------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        core = self._ensure_core()
        core.set_replicas(r.replica_id.unique_id for r in replicas)
        for r in replicas:
            try:
                core.apply_report(r.replica_id.unique_id, r.routing_stats)
            except Exception:  # a bad report must not stop routing to the others
                logger.exception("kvmesh: could not apply the report of %s", r.replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ensure_core().remove_replica(replica_id.unique_id)
