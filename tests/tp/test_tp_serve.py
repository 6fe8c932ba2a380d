"""A tensor-parallel replica on Ray Serve: its own placement group, the same greedy tokens as a
TP-1 replica over HTTP, and a lost rank worker gets the whole replica replaced, leaving no
orphaned workers behind."""

from __future__ import annotations

import time

import httpx
import pytest
from kvmesh_testing import free_port, wait_until_ok

ENGINE = dict(block_size=16, num_kv_blocks=128, max_num_seqs=8, max_model_len=512)
PROMPTS = [[5, 17, 29, 41, 53, 65, 77, 89], [300, 200, 100, 7], list(range(40, 100))]


def _tp_workers() -> list[tuple[str, int]]:
    """Live TP worker actors of this cluster: (actor id, pid)."""
    from ray._private import state

    return [
        (actor_id, a["Pid"])
        for actor_id, a in state.actors().items()
        if a["State"] == "ALIVE" and "TPWorker" in a["ActorClassName"]
    ]


@pytest.fixture(scope="module")
def tp_app(ray_local, make_tiny_model):
    from ray import serve

    from kvmesh.cluster.app import build_app
    from kvmesh.cluster.app_config import AppConfig

    model = make_tiny_model("llama", num_key_value_heads=2)
    port = free_port()

    def entry(name: str, tp: int) -> dict:
        return {
            "name": name,
            "engine": {"model": str(model), "tensor_parallel_size": tp, **ENGINE},
            "num_cpus": 0,
            "torch_threads": 1,
            "health_check_period_s": 0.5,
            "graceful_shutdown_timeout_s": 2.0,
        }

    config = AppConfig.model_validate(
        {"name": "kvmesh-tp", "port": port, "models": [entry("tp1", 1), entry("tp2", 2)]}
    )
    # The suite's serving tests may already run Serve (their session app holds "/"): then
    # this app joins it under its own prefix, on that Serve's port.
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": port})  # no-op if running
    port = _get_global_client().http_config.port
    serve.run(build_app(config), name=config.name, route_prefix="/kvmesh-tp", blocking=False)
    url = f"http://127.0.0.1:{port}/kvmesh-tp"
    try:
        wait_until_ok(f"{url}/ready", timeout_s=180)
        yield url
    finally:
        serve.delete(config.name)


def _greedy(url: str, model: str) -> tuple[list[str], str]:
    tokens, replica = [], ""
    with httpx.Client(base_url=url, timeout=60) as c:
        for prompt in PROMPTS:
            r = c.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            tokens.append(choice["text"])
            replica = r.headers["x-kvmesh-replica"]
    return tokens, replica


@pytest.mark.slow
def test_a_tp2_replica_answers_like_tp1_and_is_replaced_when_a_rank_dies(tp_app):
    import psutil

    want, _ = _greedy(tp_app, "tp1")
    got, replica = _greedy(tp_app, "tp2")
    assert got == want
    (worker,) = _tp_workers()  # rank 1 of the one TP-2 replica, in its placement group

    # Lose the rank's process: the replica turns unhealthy, Serve replaces the whole group.
    psutil.Process(worker[1]).kill()
    deadline = time.monotonic() + 120
    new_replica = replica
    while time.monotonic() < deadline:
        try:
            got, new_replica = _greedy(tp_app, "tp2")
            if new_replica != replica:
                break
        except (AssertionError, httpx.HTTPError):
            pass
        time.sleep(1)
    assert new_replica != replica, "the replica that lost a rank was not replaced"
    assert got == want
    # The old group is gone: one live rank worker (the new replica's), not the killed one.
    workers = _tp_workers()
    assert len(workers) == 1 and workers[0][0] != worker[0], workers
    assert not psutil.pid_exists(worker[1]) or psutil.Process(worker[1]).status() == "zombie"


def test_tensor_parallel_size_gives_each_replica_a_strict_pack_group():
    from kvmesh.cluster.app import model_deployment_options
    from kvmesh.cluster.serve_cmd import config_from_args

    config = config_from_args(replicas=2, tensor_parallel_size=4)  # kvmesh serve flags
    (model,) = config.models
    options = model_deployment_options(model, config.name)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert (
        options["placement_group_bundles"]
        == [{"CPU": max(1.0, model.num_cpus)}] + [{"CPU": 1.0}] * 3
    )
    assert options["num_replicas"] == 2  # Serve scales whole groups
