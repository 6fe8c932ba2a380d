"""The ``kvmesh serve`` config file: models, replicas, engine arguments, limits, keys.

Strict pydantic throughout: an unknown or misspelt key is an error naming where it is, not a
silently ignored setting. One file describes the whole app; ``cluster/app.py`` turns it into
Serve deployments and ``kvmesh build-config`` into a Ray Serve config for ``serve deploy``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvmesh.replicas.deployment import ReplicaOptions
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.step_threads import BURST_THREADS_HELP, DEFAULT_BURST_MIN_TOKENS
from kvmesh.router.auth import check_api_key
from kvmesh.router.limits import RequestLimits
from kvmesh.router.replica_client import ReplicaTransport

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
ROUTERS = {
    "power_of_two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "prefix_aware": "kvmesh.router.request_router:PrefixAwareRequestRouter",
    "round_robin": "kvmesh.router.baselines:RoundRobinRequestRouter",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


AUTOSCALED_DRAIN_S = 300.0
"""Default graceful_shutdown_timeout_s of an autoscaled model: a removed replica's longest
stream (a few thousand tokens on a slow replica) finishes inside it."""

SERVE_ONLY_KEYS = {
    "target_ongoing_requests": "target_queue_s / waiting_high",
    "upscale_delay_s": "up_window_s",
    "downscale_delay_s": "down_window_s",
    "upscaling_factor": "max_step_up",
    "downscaling_factor": "down_window_s",
    "upscale_smoothing_factor": "max_step_up",
    "downscale_smoothing_factor": "down_window_s",
    "smoothing_factor": "max_step_up",
    "downscale_to_zero_delay_s": "down_window_s",
}
"""Serve keys that only its request-count policy reads, and kvmesh's knob for the same job."""

KVMESH_POLICY_SERVE_DEFAULTS = {"metrics_interval_s": 1.0, "look_back_period_s": 5.0}
"""Replicas report every second (Serve's default is 10 s: a burst would wait that long)."""

KVMESH_POLICY_SERVE_FIXED = {
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 0.0,
    "downscale_to_zero_delay_s": 0.0,
}
"""Serve wraps every custom policy in its own delay logic (30 s up, 600 s down by default):
kvmesh's policy has its own windows, so Serve's must pass each decision straight through (a
30 s hold on top of a policy that re-decides every tick would never scale at all)."""


def serve_autoscaling_config(value: dict[str, Any], *, model: str, app: str) -> dict[str, Any]:
    """A model's ``autoscaling`` block as Ray Serve's ``autoscaling_config``.

    ``policy: kvmesh`` (the default) runs ``cluster.autoscaling``: its knobs go to the policy,
    Serve's bounds and metric windows to Serve. ``policy: serve`` passes everything to Ray's
    request-count policy unchanged.
    """
    import warnings

    from ray.serve.config import AutoscalingConfig

    from kvmesh.cluster.autoscaling import AutoscalerConfig

    value = dict(value)
    policy = value.pop("policy", "kvmesh")
    serve_keys = set(AutoscalingConfig.model_fields) - {"policy"}
    if policy == "serve":
        unknown = sorted(set(value) - serve_keys)
        if unknown:
            raise ValueError(f"unknown autoscaling keys: {', '.join(unknown)}")
        out = value
    elif policy == "kvmesh":
        ours = set(AutoscalerConfig.model_fields)
        unknown = sorted(set(value) - ours - serve_keys)
        if unknown:
            raise ValueError(f"unknown autoscaling keys: {', '.join(unknown)}")
        for key in sorted(set(value) & set(SERVE_ONLY_KEYS)):
            raise ValueError(
                f"autoscaling.{key} is read only by Ray Serve's request-count policy; "
                f"kvmesh's policy uses {SERVE_ONLY_KEYS[key]} (or set policy: serve)"
            )
        knobs = {k: v for k, v in value.items() if k in ours}
        AutoscalerConfig(**knobs)
        out = {**KVMESH_POLICY_SERVE_DEFAULTS}
        out.update({k: v for k, v in value.items() if k in serve_keys})
        out.update(KVMESH_POLICY_SERVE_FIXED)
        out["policy"] = {
            "policy_function": "kvmesh.cluster.autoscaling:ServeAutoscalingPolicy",
            "policy_kwargs": {"model": model, "app": app, **knobs},
        }
    else:
        raise ValueError(f"autoscaling.policy: {policy!r} is not 'kvmesh' or 'serve'")
    with warnings.catch_warnings():  # metrics_interval_s: deprecated, still what replicas read
        warnings.simplefilter("ignore", DeprecationWarning)
        AutoscalingConfig(**out)
    return out


class ModelConfig(_Strict):
    """One served model: its own deployment, with its own replicas."""

    name: str = Field(pattern=NAME_PATTERN, description="The `model` clients ask for.")
    engine: EngineArgs = Field(default_factory=EngineArgs)
    replicas: int = Field(default=1, ge=1)
    autoscaling: dict[str, Any] | None = Field(
        default=None,
        description="Autoscaling (replaces `replicas`): min_replicas, max_replicas and "
        "kvmesh's policy knobs (cluster/autoscaling.py), or `policy: serve` with Ray Serve's "
        "autoscaling_config keys.",
    )
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_replicas_per_node: int | None = Field(
        default=None,
        ge=1,
        description="At most this many of this model's replicas on one Ray node (Serve's "
        "option): spreads replicas over nodes, so losing a node loses only its share; null: "
        "no limit. Not with tensor_parallel_size > 1 (its placement group already decides).",
    )
    torch_threads: int | None = Field(default=None, ge=1)
    torch_threads_burst: int | None = Field(
        default=None,
        ge=1,
        description=BURST_THREADS_HELP,
    )
    burst_min_tokens: int = Field(default=DEFAULT_BURST_MIN_TOKENS, ge=1)
    max_pending_requests: int | None = Field(
        default=256, ge=1, description="Requests one replica's engine holds; more get 429."
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="Serve's per-replica cap.")
    max_queued_requests: int = Field(
        default=512, ge=1, description="Requests queued for this model's replicas; more get 503."
    )
    max_queue_delay_s: float | None = Field(
        default=30.0,
        gt=0,
        description="A replica refuses (429) requests it expects to wait longer than this "
        "for prefill; null admits everything up to max_pending_requests.",
    )
    max_inter_token_latency_s: float | None = Field(
        default=None,
        gt=0,
        description="A replica refuses (429) new requests while its decode steps (every "
        "running request's inter-token latency) take longer than this; null: off.",
    )
    watchdog_s: float | None = Field(
        default=120.0,
        gt=0,
        description="A replica with requests in flight and no engine step finished for this "
        "long reports itself unhealthy (Serve replaces it).",
    )
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    health_check_period_s: float = Field(default=2.0, gt=0)
    request_router: str | None = Field(
        default=None,
        description="prefix_aware (kvmesh's cache- and load-aware router), power_of_two "
        "(Serve's), round_robin, or a 'module:Class' path. null: prefix_aware when the model "
        "can run more than one replica (replicas > 1, or autoscaling max_replicas > 1), else "
        "power_of_two (one replica leaves nothing to choose, so no cache reports are made).",
    )
    router_options: dict[str, Any] = Field(
        default_factory=dict,
        description="request_router_kwargs; for prefix_aware, RouterConfig fields.",
    )
    routing_stats_period_s: float = Field(
        default=1.0, gt=0, description="How often Serve pulls record_routing_stats."
    )

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value: Any) -> Any:
        return EngineArgs.model_validate(value) if isinstance(value, dict) else value

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            serve_autoscaling_config(value, model="check", app="check")  # raises on mistakes
        return value

    @model_validator(mode="after")
    def _drain_time(self) -> ModelConfig:
        # A replica the autoscaler removes finishes its streams first: give them time.
        if self.autoscaling is not None and "graceful_shutdown_timeout_s" not in (
            self.model_fields_set
        ):
            self.graceful_shutdown_timeout_s = AUTOSCALED_DRAIN_S
        return self

    @model_validator(mode="after")
    def _spread(self) -> ModelConfig:
        # Serve refuses the pair (a placement group already fixes where a replica goes); say
        # so here, in kvmesh's terms, instead of as a failed deployment.
        if self.max_replicas_per_node is not None and self.engine.tensor_parallel_size > 1:
            raise ValueError(
                "max_replicas_per_node does not combine with tensor_parallel_size > 1: each "
                "tensor-parallel replica has its own STRICT_PACK placement group; drop one"
            )
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this model can run (Serve's autoscaling default max is 1)."""
        if self.autoscaling is not None:
            return int(self.autoscaling.get("max_replicas", 1))
        return self.replicas

    @property
    def router_name(self) -> str:
        """``request_router``, or the default for this model's replica count."""
        if self.request_router is not None:
            return self.request_router
        # Where there is a choice, the router that knows the replicas' caches makes it.
        # (Resolved on use, not stored: `--replicas` rewrites a dumped config.)
        return "prefix_aware" if self.max_replicas > 1 else "power_of_two"

    @model_validator(mode="after")
    def _router(self) -> ModelConfig:
        if self.request_router is None and self.router_options and not self.prefix_aware:
            # The options would go to Serve's power of two, which takes none of them.
            raise ValueError(
                f"router_options are set but this model routes with {self.router_name} by "
                "default (one replica); set request_router (prefix_aware for kvmesh's "
                "router) or drop router_options"
            )
        if self.prefix_aware:
            from kvmesh.router.routing.config import RouterConfig

            RouterConfig(**self.router_kwargs())
        elif self.router_name not in ROUTERS and ":" not in self.router_name:
            raise ValueError(
                f"request_router: {self.router_name!r} is not one of "
                f"{', '.join(ROUTERS)} or a 'module:Class' path"
            )
        return self

    @property
    def router_class(self) -> str:
        return ROUTERS.get(self.router_name, self.router_name)

    @property
    def prefix_aware(self) -> bool:
        return self.router_class == ROUTERS["prefix_aware"]

    def router_kwargs(self) -> dict[str, Any]:
        """kvmesh's router must hash blocks as this model's engine does: same block size."""
        if self.prefix_aware:
            return {
                "block_size": self.engine.block_size,
                "model_name": self.name,
                **self.router_options,
            }
        return dict(self.router_options)

    def replica_options(self, app: AppConfig) -> dict[str, Any]:
        return ReplicaOptions(
            max_pending_requests=self.max_pending_requests,
            max_queue_delay_s=self.max_queue_delay_s,
            max_inter_token_latency_s=self.max_inter_token_latency_s,
            watchdog_s=self.watchdog_s,
            torch_threads=self.torch_threads,
            torch_threads_burst=self.torch_threads_burst,
            burst_min_tokens=self.burst_min_tokens,
            stats_push_period_s=app.stats_push_period_s,
            shutdown_timeout_s=self.graceful_shutdown_timeout_s,
            report_cache=self.prefix_aware,
            debug_hooks=app.debug_hooks,
        ).model_dump()


class AliasConfig(_Strict):
    """A name that splits traffic by weight between served models (canary / A-B)."""

    name: str = Field(pattern=NAME_PATTERN)
    weights: dict[str, float] = Field(min_length=1)

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w <= 0 for w in value.values()):
            raise ValueError("weights must be positive")
        return value


class ResponseCacheConfig(_Strict):
    enabled: bool = False
    max_entries: int = Field(default=1024, ge=1)
    max_bytes: int = Field(default=64 << 20, ge=1, description="Approximate memory bound.")


class AppConfig(_Strict):
    """The whole app. Every field has a default: an empty file serves the embedded model."""

    name: str = Field(default="kvmesh", pattern=r"^[A-Za-z0-9_-]+$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = "/"
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig(name=default_name())])
    aliases: list[AliasConfig] = Field(default_factory=list)
    api_keys: list[str] = Field(
        default_factory=list,
        description="For `kvmesh serve` only; never written by build-config (use "
        "KVMESH_API_KEYS or api_keys_file on a cluster).",
    )
    api_keys_file: str | None = Field(
        default=None, description="A file with one API key per line, read by the ingress."
    )
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    ingress_replicas: int = Field(default=1, ge=1)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description="Where Serve runs HTTP proxies: on every node (a load balancer in front "
        "spreads clients over them; KubeRay's serve Service does) or only on the head (one "
        "address to call; what several Ray nodes sharing one machine's ports need).",
    )
    ingress_on_head: bool = Field(
        default=False,
        description="Run the ingress and the stats hub on the Ray head node: on a cluster "
        "whose workers come and go (autoscaled or preemptible GPU nodes), losing a worker "
        "then loses only its model replicas, never the streams of the whole app.",
    )
    stats_push_period_s: float = Field(default=0.5, gt=0)
    replica_transport: ReplicaTransport = Field(
        default="grpc",
        description="How requests and their streamed tokens travel from the ingress to the "
        "model replicas: Serve's direct gRPC channel between replicas (grpc), or Ray actor "
        "calls with a Ray object per chunk (object_ref, Serve's default).",
    )
    debug_hooks: bool = Field(
        default=False,
        description="Test-only: a request header can make its replica exit mid-stream.",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for key in value:
            check_api_key(key, "api_keys")
        return value

    @model_validator(mode="after")
    def _names(self) -> AppConfig:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate names {dupes}")
        deployments = [deployment_name(n) for n in names]
        if len(set(deployments)) != len(deployments):
            raise ValueError("models: names differ only in characters Serve cannot use")
        for alias in self.aliases:
            if alias.name in names:
                raise ValueError(f"aliases: {alias.name!r} is also a model name")
            unknown = sorted(set(alias.weights) - set(names))
            if unknown:
                raise ValueError(f"aliases: {alias.name!r} points at unknown models {unknown}")
        return self

    def ingress_config(self) -> dict[str, Any]:
        """What the ingress deployment is built with (``router.ingress.IngressConfig``)."""
        return {
            "models": {m.name: m.engine.model_dump(exclude_defaults=True) for m in self.models},
            "aliases": {a.name: dict(a.weights) for a in self.aliases},
            "api_keys": list(self.api_keys),
            "api_keys_file": self.api_keys_file,
            "response_cache_entries": (
                self.response_cache.max_entries if self.response_cache.enabled else 0
            ),
            "response_cache_bytes": self.response_cache.max_bytes,
            "max_pending_requests": {m.name: m.max_pending_requests for m in self.models},
            "limits": self.limits.model_dump(),
            "replica_transport": self.replica_transport,
            "debug_hooks": self.debug_hooks,
            "app_name": self.name,
        }

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


def default_name() -> str:
    from kvmesh.replicas.model_files import EMBEDDED_MODEL_NAME

    return EMBEDDED_MODEL_NAME


def deployment_name(model: str) -> str:
    """Serve deployment names may not hold '#' or '/': keep them readable but safe."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


def example_config_path(name: str) -> Path | None:
    """A config shipped in ``kvmesh.configs`` (``serve_canary`` or ``serve_canary.yaml``)."""
    from importlib.resources import files

    for candidate in (name, f"{name}.yaml"):
        path = Path(str(files("kvmesh.configs") / candidate))
        if path.is_file():
            return path
    return None


def load_config(path: str | Path) -> AppConfig:
    """Read a YAML (or JSON) config; errors name the file and the offending key.

    A bare name that is not a file here is looked up among the example configs shipped in
    ``kvmesh.configs`` (so ``--config serve_canary`` works from any directory).
    """
    path = Path(path)
    if not path.exists() and len(path.parts) == 1:
        path = example_config_path(path.name) or path
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: the top level must be a mapping")
    try:
        return AppConfig.model_validate(raw)
    except Exception as exc:
        raise ValueError(f"config {path}: {exc}") from exc
