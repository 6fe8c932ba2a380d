"""Build the Serve application from an ``AppConfig``.

One deployment per served model (``model-<name>``, its own replicas and router), a stats hub,
and the FastAPI ingress that holds a handle to each model deployment. ``app_builder`` is the
``import_path`` target of the Ray Serve config ``kvmesh build-config`` writes; its ``args`` are
the kvmesh config itself, validated here, strictly, when Serve builds the app.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from kvmesh.cluster.app_config import (
    AppConfig,
    ModelConfig,
    deployment_name,
    serve_autoscaling_config,
)
from kvmesh.replicas.deployment import LLMReplica
from kvmesh.router.ingress import Ingress, IngressConfig
from kvmesh.router.routing import CacheReporter
from kvmesh.router.stats_hub import StatsHub

INGRESS_NAME = "kvmesh-ingress"
STATS_HUB_NAME = "kvmesh-stats"
IMPORT_PATH = "kvmesh.cluster.app:app_builder"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has 1 of it


def model_deployment_options(m: ModelConfig, app_name: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": deployment_name(m.name),
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
        "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
        "health_check_period_s": m.health_check_period_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=m.router_class,
            request_router_kwargs=m.router_kwargs(),
            # Routers that read load and cache contents from record_routing_stats want them
            # fresher than Serve's 10 s default.
            request_routing_stats_period_s=m.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * m.routing_stats_period_s),
        ),
    }
    if m.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = m.max_replicas_per_node
    options.update(tensor_parallel_placement(m))
    if m.autoscaling is not None:
        options["autoscaling_config"] = serve_autoscaling_config(
            m.autoscaling, model=m.name, app=app_name
        )
    else:
        options["num_replicas"] = m.replicas
    return options


def tensor_parallel_placement(m: ModelConfig) -> dict[str, Any]:
    """A tensor-parallel replica's own placement group: one bundle per rank, all on one node
    (``STRICT_PACK``). The replica actor sits in bundle 0 and creates its rank workers in the
    others (``replicas/tp/ray_workers.py``), so they live and die with it and autoscaling adds or
    removes whole groups. One GPU per rank on GPU nodes, one CPU per rank otherwise."""
    from kvmesh.replicas.tp.ray_workers import tp_bundles

    tp = m.engine.tensor_parallel_size
    if tp == 1:
        return {}
    bundles = tp_bundles(tp, use_gpu=m.num_gpus > 0)
    # Bundle 0 holds the replica actor: at least what it asks for.
    bundles[0] = {
        k: max(v, {"CPU": m.num_cpus, "GPU": m.num_gpus}[k]) for k, v in bundles[0].items()
    }
    return {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}


def control_actor_options(config: AppConfig) -> dict[str, Any]:
    """Ray options of the app's own pieces (ingress, stats hub): no CPU of their own (they
    only wait on replicas), and on the head node when asked (Ray's built-in head resource)."""
    options: dict[str, Any] = {"num_cpus": 0}
    if config.ingress_on_head:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return options


def build_app(config: AppConfig) -> Application:
    hub = (
        serve.deployment(StatsHub)
        .options(
            name=STATS_HUB_NAME, num_replicas=1, ray_actor_options=control_actor_options(config)
        )
        .bind(expiry_s=max(5.0, 10 * config.stats_push_period_s))
    )
    model_apps = {}
    for m in config.models:
        deployment = serve.deployment(LLMReplica).options(
            **model_deployment_options(m, config.name)
        )
        # The replica reports its cache contents through the router's reporter, injected
        # here (a replica never imports the router); it is used with report_cache only.
        model_apps[m.name] = deployment.bind(
            m.engine.model_dump(exclude_defaults=True),
            m.name,
            m.replica_options(config),
            hub,
            CacheReporter,
        )
    # Check what the ingress will be built with here, where a mistake is one clear error,
    # rather than inside Serve (a failed deployment whose cause is only in Ray's logs).
    ingress_config = IngressConfig.model_validate(config.ingress_config()).model_dump()
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_NAME,
        num_replicas=config.ingress_replicas,
        ray_actor_options=control_actor_options(config),
        max_ongoing_requests=10_000,  # the ingress only waits on replicas; limits live there
    )
    return ingress.bind(ingress_config, model_apps, hub)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``args`` is a kvmesh config (see ``cluster/app_config.py``)."""
    return build_app(AppConfig.model_validate(args))
