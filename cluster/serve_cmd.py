"""``kvmesh serve`` and ``kvmesh build-config``.

``serve`` starts a local Ray cluster (or joins the one ``RAY_ADDRESS`` names), deploys the app,
waits until every model answers, prints the URL and runs until Ctrl-C, then takes down what it
started: the whole local cluster, or only its own app on a joined one.

``build-config`` writes the same app as a Ray Serve config file for ``serve deploy``: one
application whose ``import_path`` is kvmesh's app builder and whose ``args`` are the kvmesh
config. ``ServeDeploySchema`` ignores keys it does not know, so we check those ourselves.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel

from kvmesh.cluster.app_config import AppConfig, load_config
from kvmesh.cluster.serve_env import apply_serve_process_env
from kvmesh.router import autoscaler_reports

READY_POLL_S = 0.5


def threads_per_replica(cpus: int, replicas: int) -> int:
    """Ray CPUs per replica when no config says: the machine's cores split between the
    replicas, less one core Ray keeps for Serve's own actors (proxy, ingress, stats hub)."""
    return max(1, (cpus - 1) // replicas)


def engine_threads_per_replica(cpus: int, replicas: int) -> int:
    """Torch threads per replica when no config says: its whole share of the cores, the one
    Ray keeps for Serve included.

    Measured on a 2-core Intel machine with AMX (SmolLM2, bfloat16, one replica;
    ``bench/serve_vs_vllm.py``, six alternated runs): two threads for every step gave a TPOT
    p50 of 22.9-24.7 ms at concurrency 1, where one thread for single-token steps and two for
    steps of 8+ tokens (the earlier default) gave 29.9-32.8 ms; TTFT and throughput at
    concurrency 16 were level. Serve streams one token per step at low concurrency, too
    little to need a core of its own. The earlier measurements that favoured one thread were
    taken while a replica built its engine on one thread and stepped it on another, which left
    two OpenMP teams fighting over the cores (fixed since).
    """
    return max(1, cpus // replicas)


def config_from_args(
    config_path: str | None = None,
    model: str | None = None,
    replicas: int | None = None,
    host: str | None = None,
    port: int | None = None,
    tensor_parallel_size: int | None = None,
    router: str | None = None,
    *,
    split_local_cores: bool = True,
) -> AppConfig:
    """The app config from a file and/or command-line flags (flags win). Without a file and
    with ``split_local_cores``, replicas share this machine's cores (``kvmesh serve``); a
    deploy to another cluster keeps the config's defaults instead."""
    config = load_config(config_path) if config_path else AppConfig()
    data = config.model_dump()
    if model is not None or not config_path:
        if config_path and len(config.models) != 1:
            raise ValueError("--model needs a config with exactly one model (or no --config)")
        n = replicas or config.models[0].replicas
        base = config.models[0]
        threads = {
            "num_cpus": base.num_cpus,
            "torch_threads": base.torch_threads,
            "torch_threads_burst": base.torch_threads_burst,
        }
        if split_local_cores and not config_path:
            # Without a config file, split this machine's cores between the replicas: Ray
            # keeps one CPU for Serve's actors, the engines still use every core.
            cpus = os.cpu_count() or 1
            threads = {
                "num_cpus": float(threads_per_replica(cpus, n)),
                "torch_threads": engine_threads_per_replica(cpus, n),
                "torch_threads_burst": None,
            }
        engine = base.engine.model_dump()
        name = base.name
        if model is not None:
            engine["model"] = model
            name = Path(model).name.removesuffix(".gguf") or name
        data["models"] = [
            {
                **base.model_dump(),
                "name": name,
                "engine": engine,
                "replicas": n,
                **threads,
            }
        ]
    elif replicas is not None:
        for m in data["models"]:
            m["replicas"] = replicas
    if tensor_parallel_size is not None:
        for m in data["models"]:
            m["engine"]["tensor_parallel_size"] = tensor_parallel_size
    if router is not None:
        for m in data["models"]:
            m["request_router"] = router
    if host is not None:
        data["host"] = host
    if port is not None:
        data["port"] = port
    return AppConfig.model_validate(data)


# ---- build-config -------------------------------------------------------------------------
def serve_config(config: AppConfig) -> dict[str, Any]:
    """The Ray Serve config (``ServeDeploySchema``) that deploys ``config``.

    API keys are never written into it: a Serve config is shown by ``serve status`` and the
    dashboard, and ends up in version control. Keys reach a cluster through ``KVMESH_API_KEYS``
    (the Ray runtime environment or the pod spec's secret) or ``api_keys_file``.
    """
    from kvmesh.cluster.app import IMPORT_PATH

    if config.api_keys:
        raise ValueError(
            "api_keys would be written into the Serve config in clear text: remove them and "
            "set KVMESH_API_KEYS on the cluster (or api_keys_file: a file of keys on each node)"
        )

    return {
        "proxy_location": config.proxy_location,
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": config.name,
                "route_prefix": config.route_prefix,
                "import_path": IMPORT_PATH,
                "args": config.model_dump(mode="json", exclude_defaults=True),
            }
        ],
    }


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``Optional[X]``, ``List[X]`` or ``Dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Keys in ``data`` that ``model`` (recursively) does not define."""
    if isinstance(data, list):
        return [k for i, item in enumerate(data) for k in unknown_keys(item, model, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    aliases = {f.alias: name for name, f in fields.items() if f.alias}
    found = []
    for key, value in data.items():
        name = aliases.get(key, key)
        where = f"{path}.{key}" if path else key
        if name not in fields:
            found.append(where)
            continue
        if name == "args":
            continue  # free-form for Serve; kvmesh validates it strictly itself
        inner = _model_class(fields[name].annotation)
        if inner is not None:
            found.extend(unknown_keys(value, inner, where))
    return found


def check_serve_config(data: dict[str, Any]) -> list[str]:
    """Every problem with a Serve config for kvmesh: schema errors, unknown keys, bad args."""
    from ray.serve.schema import ServeDeploySchema

    from kvmesh.cluster.app import IMPORT_PATH

    problems = [f"unknown key: {k}" for k in unknown_keys(data, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(data)
    except Exception as exc:  # reported, not raised
        problems.append(f"ServeDeploySchema: {exc}")
    for app in data.get("applications") or []:
        if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH:
            args = app.get("args") or {}
            if isinstance(args, dict) and args.get("api_keys"):
                problems.append(
                    f"application {app.get('name')!r} args: api_keys in a Serve config are "
                    "readable by anyone who can read the config; use KVMESH_API_KEYS or "
                    "api_keys_file"
                )
            try:
                AppConfig.model_validate(args)
            except Exception as exc:
                problems.append(f"application {app.get('name')!r} args: {exc}")
    return problems


def write_serve_config(config: AppConfig, out: str | Path | None) -> str:
    data = serve_config(config)
    problems = check_serve_config(data)
    if problems:
        raise ValueError("generated Serve config is invalid:\n" + "\n".join(problems))
    text = (
        "# Ray Serve config for kvmesh, written by `kvmesh build-config`.\n"
        "# Deploy with: serve deploy <this file>   (kvmesh must be installed on every node)\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    if out is not None:
        Path(out).write_text(text)
    return text


# ---- serve --------------------------------------------------------------------------------
def wait_until_ready(url: str, timeout_s: float | None = None, log=print) -> None:
    start = time.monotonic()
    last_note = start
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")
        if now - last_note > 15:
            log(f"still loading models ({now - start:.0f}s)...")
            last_note = now
        time.sleep(READY_POLL_S)


def run_serve(config: AppConfig, ready_timeout_s: float | None = None) -> int:
    import ray
    from ray import serve

    from kvmesh.cluster.app import build_app

    joined = bool(os.environ.get("RAY_ADDRESS"))
    if joined:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # "local": a new cluster, never one a `ray start` left running on this machine (its
        # Serve would be shut down with ours).
        apply_serve_process_env()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    try:
        serve.start(
            proxy_location=config.proxy_location,
            http_options={"host": config.host, "port": config.port},
        )
        serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
        wait_until_ready(config.url, ready_timeout_s)
        models = ", ".join(m.name for m in config.models)
        print(f"kvmesh is serving {models} at {config.url}  (OpenAI API under {config.url}/v1)")
        print("Ctrl-C to stop.", flush=True)
        # Handle SIGINT ourselves too: a shell starts background jobs with SIGINT ignored.
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nshutting down...", file=sys.stderr, flush=True)
        try:
            if joined:
                serve.delete(config.name)
                autoscaler_reports.clear(config.name, [m.name for m in config.models])
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
