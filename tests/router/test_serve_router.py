"""The RequestRouter inside a real (small) Ray Serve app whose replicas are stand-ins.

``Stub`` replicas hold no model: each call "caches" the prompt's blocks (emits BlockStored for
them) and answers which replica served it; ``record_routing_stats`` returns the
``CacheReporter`` payload. ``Front`` forwards calls through its own handle, so its router is a
second, independent router in another process that knows only what the reports say.
"""

from __future__ import annotations

import time

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from kvmesh.replicas.block_hash import hash_block_tokens
from kvmesh.replicas.kv.events import BlockStored
from kvmesh.router.routing import CacheReporter, ReporterConfig, RoutingHint

pytestmark = pytest.mark.slow

BS = 16
APP = "router-test"


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class="kvmesh.router.request_router:PrefixAwareRequestRouter",
        request_router_kwargs={"block_size": BS, "seed": 0, "model_name": "stub"},
        request_routing_stats_period_s=0.2,
        request_routing_stats_timeout_s=2.0,
    ),
)
class Stub:
    def __init__(self) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self.reporter = CacheReporter(ReporterConfig(snapshot_interval_s=1.0), block_size=BS)
        self.events: list = []

    async def __call__(self, hint: RoutingHint) -> dict:
        self.reporter.on_request(hint)
        parent = None
        for h in hint.prompt_block_hashes:
            self.events.append(BlockStored(h, parent, BS))
            parent = h
        return {"replica": self.name, "router_id": hint.router_id, "seq": hint.router_seq}

    def record_routing_stats(self) -> dict:
        events, self.events = self.events, []
        return self.reporter.report(events=events, load={"num_requests_running": 0})


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    def __init__(self, stub) -> None:
        self.stub = stub

    async def __call__(self, hint: RoutingHint) -> dict:
        return await self.stub.remote(hint)


def _hint(tenant: int, n: int, turn: int = 0) -> RoutingHint:
    tokens = [(tenant * 31 + i) % 5000 + 1 for i in range(n)] + [7] * (turn * BS)
    return RoutingHint(hash_block_tokens(tokens, BS, ("stub",)), len(tokens))


@pytest.fixture(scope="module")
def app():
    started = not ray.is_initialized()  # reuse a Ray another module left running
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        front = serve.run(Front.bind(Stub.bind()), name=APP, route_prefix=None)
        stub = serve.get_deployment_handle("Stub", app_name=APP)
        yield front, stub
    finally:
        serve.delete(APP)
        if started:
            serve.shutdown()
            ray.shutdown()


def _router(handle):
    return handle._router._asyncio_router.request_router


def _wait(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_prefix_routing_through_serve(app):
    front, stub = app
    first = stub.remote(_hint(1, 1280)).result()
    assert first["router_id"] and first["seq"] > 0  # the router stamped the request
    owner = first["replica"]
    # Later turns of the same prefix follow at once (speculation, before any report).
    for turn in range(1, 6):
        got = stub.remote(_hint(1, 1280, turn)).result()["replica"]
        assert got == owner, f"turn {turn} went to {got}, not {owner}"

    # The driver's router learns the blocks from the replica's own report.
    core = _router(stub).core
    key = _hint(1, 1280).prompt_block_hashes[-1][:8]
    assert _wait(lambda: key in core.index.confirmed_keys(owner) and core.is_synced(owner))

    # Front's router never routed tenant 1. It starts with its first call (another tenant);
    # once a snapshot-bearing report (every 1 s here) has reached it, it sends tenant 1 to the
    # same replica from the reports alone.
    front.remote(_hint(99, 64)).result()
    time.sleep(2.5)
    for turn in range(6, 9):
        got = front.remote(_hint(1, 1280, turn)).result()["replica"]
        assert got == owner, f"Front sent turn {turn} to {got}, not {owner}"


def test_dead_replica_is_routed_around(app):
    _, stub = app
    owner = stub.remote(_hint(2, 320)).result()["replica"]
    core = _router(stub).core
    assert owner in core.replicas
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].endswith(owner) and "Stub" in a["name"]
    )
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    # Requests for the dead replica's prefix still complete, elsewhere.
    served = {stub.remote(_hint(2, 320, t)).result()["replica"] for t in range(1, 4)}
    assert owner not in served
    assert _wait(lambda: owner not in core.replicas)
