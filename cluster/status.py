"""``kvmesh status``: one screen with each model's replicas, load and autoscaler decision.

Reads a running app over HTTP (``/debug/replicas`` and ``/debug/autoscaler``, with the API key
when the app has keys), so it works from anywhere the app's URL reaches. With a Ray address
(``--ray-address`` or ``RAY_ADDRESS``) it also asks Serve how many replicas of each model are
starting and stopping (draining), which only the controller knows.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from kvmesh.cluster.app_config import deployment_name


@dataclass
class ReplicaRow:
    replica: str
    healthy: bool
    waiting: int
    running: int
    kv_usage: float


@dataclass
class ModelStatus:
    model: str
    replicas: list[ReplicaRow] = field(default_factory=list)
    serve_states: dict[str, int] = field(default_factory=dict)
    """RUNNING / STARTING / STOPPING / ... counts from Serve (with a Ray address)."""
    autoscaler: dict[str, Any] | None = None

    @property
    def waiting(self) -> int:
        return sum(r.waiting for r in self.replicas)


def _get(client: httpx.Client, path: str) -> Any:
    r = client.get(path)
    if r.status_code == 401:
        raise ValueError(f"{path}: the app needs an API key (--api-key or KVMESH_API_KEY)")
    r.raise_for_status()
    return r.json()


def collect(
    url: str, api_key: str | None = None, ray_address: str | None = None, app: str = "kvmesh"
) -> list[ModelStatus]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
            snaps = _get(c, "/debug/replicas")
            decisions = _get(c, "/debug/autoscaler")
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the app at {url}: {exc}") from None
    models: dict[str, ModelStatus] = {}
    for snap in snaps:
        s = snap["stats"]
        m = models.setdefault(snap["model"], ModelStatus(snap["model"]))
        m.replicas.append(
            ReplicaRow(
                replica=snap["replica"],
                healthy=bool(s.get("healthy", True)),
                waiting=int(s.get("num_requests_waiting", 0)),
                running=int(s.get("num_requests_running", 0)),
                kv_usage=float(s.get("kv_cache_usage", 0.0)),
            )
        )
    for d in decisions:
        models.setdefault(d["model"], ModelStatus(d["model"])).autoscaler = d
    if ray_address:
        for model, states in serve_replica_states(ray_address, app, list(models)).items():
            models[model].serve_states = states
    for m in models.values():
        m.replicas.sort(key=lambda r: r.replica)
    return sorted(models.values(), key=lambda m: m.model)


def serve_replica_states(address: str, app: str, models: list[str]) -> dict[str, dict[str, int]]:
    """Each model deployment's replica counts by state, from Serve's controller."""
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        status = serve.status()
        application = status.applications.get(app)
        if application is None:
            return {}
        by_deployment = {deployment_name(m): m for m in models}
        out = {}
        for name, dep in application.deployments.items():
            if name in by_deployment:
                out[by_deployment[name]] = {
                    str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()
                }
        return out
    finally:
        ray.shutdown()


def render(models: list[ModelStatus]) -> str:
    lines = []
    for m in models:
        a = m.autoscaler
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(m.serve_states.items()))
        head = f"{m.model}: {len(m.replicas)} replicas reporting"
        if states:
            head += f" (serve: {states})"
        lines.append(head)
        if a is not None:
            lines.append(
                f"  autoscaler: target {a['target']} [{a['min_replicas']}..{a['max_replicas']}]"
                f", running {a['running']}, starting {a['starting']}"
                f", last decision {a['reason']} (load needs {a['needed']:.2f}"
                f", utilisation {a['utilization']:.2f}, queue {a['queue_s']:.2f}s"
                f", TTFT p90 {a['ttft_p90_s']:.2f}s)"
            )
        lines.append(f"  {'replica':<28} {'health':<9} {'waiting':>7} {'running':>7} {'KV':>6}")
        for r in m.replicas:
            health = "ok" if r.healthy else "UNHEALTHY"
            lines.append(
                f"  {r.replica:<28} {health:<9} {r.waiting:>7} {r.running:>7} {r.kv_usage:>6.1%}"
            )
    return "\n".join(lines) if lines else "no models are serving"


def as_json(models: list[ModelStatus]) -> list[dict[str, Any]]:
    return [{**asdict(m), "waiting": m.waiting} for m in models]


def default_ray_address() -> str | None:
    return os.environ.get("RAY_ADDRESS") or None
