"""The Serve adapter (PrefixAwareRequestRouter) with stand-in replicas: no Ray cluster."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest
from router_testing import BS, FakeReplica, hashes, prompt, stored

from kvmesh.replicas.serve_messages import ReplicaRequest
from kvmesh.router.request_router import PrefixAwareRequestRouter
from kvmesh.router.routing import RoutingHint

DEP = DeploymentID(name="model", app_name="app")


class StandIn:
    """The parts of RunningReplica the router touches."""

    def __init__(self, name: str, stats: dict | None = None) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEP)
        self.routing_stats = stats or {}
        self.max_ongoing_requests = 100
        self.is_cross_language = False
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _router(**kwargs) -> PrefixAwareRequestRouter:
    router = PrefixAwareRequestRouter(DEP, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=BS, seed=0, **kwargs)
    return router


def _pending(obj, request_id: str, session_id: str = "") -> PendingRequest:
    meta = RequestMetadata(request_id=request_id, internal_request_id=request_id)
    meta.session_id = session_id
    return PendingRequest(args=[obj], kwargs={}, metadata=meta)


async def test_ranks_by_cache_stamps_the_request_and_commits_on_routed():
    tokens = prompt(1, 320, suffix=1)
    reps = {n: FakeReplica(n) for n in "abc"}
    stats = {n: r.report() for n, r in reps.items()}
    stats["b"] = reps["b"].report(stored(hashes(tokens)))
    router = _router()
    replicas = {n: StandIn(n, stats[n]) for n in "abc"}
    router.update_replicas(list(replicas.values()))

    req = ReplicaRequest(
        request_id="x",
        model="m",
        prompt_token_ids=tokens,
        params=None,
        block_hashes=hashes(tokens),
    )
    pr = _pending(req, "r1")
    ranks = await router.choose_replicas(list(replicas.values()), pr)
    assert [r.replica_id.unique_id for r in ranks[0]] == ["b"]
    assert len(ranks) == 3 and len(ranks[2]) == 1  # [best], [second], [rest]
    assert req.router_id == router.core.router_id and req.router_seq == 1

    router.on_request_routed(pr, replicas["b"].replica_id, None)
    assert router.core.loads.num_pending("b") == 1
    router.on_request_completed(replicas["b"].replica_id, "r1")
    assert router.core.loads.num_pending("b") == 0


async def test_hint_session_and_plain_calls():
    router = _router(session_slack=10_000.0)
    replicas = [StandIn(n) for n in "ab"]
    router.update_replicas(replicas)
    hint = RoutingHint(hashes(prompt(2, 64)), 64)
    pr = _pending(hint, "r1", session_id="s")
    first = (await router.choose_replicas(replicas, pr))[0][0]
    router.on_request_routed(pr, first.replica_id, None)
    # The same session (from Serve's metadata: handle.options(session_id=...)) sticks.
    for i in range(5):
        other = RoutingHint(hashes(prompt(10 + i, 64)), 64)
        got = (await router.choose_replicas(replicas, _pending(other, f"q{i}", "s")))[0][0]
        assert got.replica_id == first.replica_id
    # A call without block hashes is routed by load alone.
    ranks = await router.choose_replicas(replicas, _pending("just text", "plain"))
    assert {r[0].replica_id.unique_id for r in ranks} == {"a", "b"}


async def test_dead_and_removed_replicas_are_dropped():
    router = _router()
    replicas = [StandIn(n) for n in "abc"]
    router.update_replicas(replicas)
    router.on_replica_actor_died(replicas[0].replica_id)
    assert sorted(router.core.replicas) == ["b", "c"]
    router.update_replicas(replicas[1:2])
    assert router.core.replicas == ["b"]


def test_unknown_router_kwargs_are_rejected():
    with pytest.raises(ValueError):
        _router(not_a_knob=1)


async def test_a_request_cancelled_before_it_is_sent_releases_its_reservation():
    """A caller that leaves while its request waits for a replica: the replica never hears of
    it, so the reservation must go, or that replica looks busy until the backstop expires."""
    router = _router()
    replicas = [StandIn(n) for n in "ab"]
    router.update_replicas(replicas)
    hint = RoutingHint(hashes(prompt(3, 64)), 64)
    left = _pending(hint, "left")
    best = (await router.choose_replicas(replicas, left))[0][0].replica_id.unique_id
    await router.choose_replicas(replicas, left)  # Serve asks again after a backoff
    assert router.core.loads.num_pending() == 1
    left.future.cancel()
    await asyncio.sleep(0)  # done callbacks run on the loop
    assert router.core.loads.num_pending() == 0
    assert router.core.loads.num_pending(best) == 0

    # A request that was sent keeps its load until it completes.
    sent = _pending(RoutingHint(hashes(prompt(4, 64)), 64), "sent")
    chosen = (await router.choose_replicas(replicas, sent))[0][0]
    sent.future.set_result(chosen)
    router.on_request_routed(sent, chosen.replica_id, None)
    await asyncio.sleep(0)
    assert router.core.loads.num_pending(chosen.replica_id.unique_id) == 1
