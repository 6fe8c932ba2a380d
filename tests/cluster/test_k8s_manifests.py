"""The Kubernetes manifests in ``k8s/``: rendered and validated here, without a cluster.

No kustomize binary and no API server: ``render`` below implements the few kustomize features
the manifests use (``resources``, JSON 6902 ``patches``, ``images``, ``configMapGenerator``) and
refuses any other, so a manifest cannot silently use something this test does not understand.

* Every ``RayService`` is validated against the vendored KubeRay CRD schema (``ray.io/v1``,
  ``data/kuberay/``), strictly: unknown fields are errors, as with ``kubectl apply``'s strict
  field validation (plain JSON Schema would accept them).
* Its ``serveConfigV2`` is what ``kvmesh build-config`` writes for its ``args``, passes
  ``check_serve_config`` (Serve's schema, unknown keys, strict ``AppConfig``), and the cluster
  around it fits it (GPUs, drain times, ports, keys from the Secret).
* The monitoring objects point at what exists (port names, Secret keys); the dashboard copy is
  the repository's dashboard byte for byte.
* Core objects are checked against Kubernetes' own schemas with ``kubernetes-validate`` when it
  is installed (skipped otherwise).

``serve_config_of(example)`` gives the Serve config an example deploys, for a fixture that
deploys it on a local Ray cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kvmesh.cluster.serve_env import SERVE_PROCESS_ENV

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMA_FILE = Path(__file__).parent / "data" / "kuberay" / "rayservice-v1.schema.json"
DASHBOARD = REPO / "configs" / "grafana" / "kvmesh-dashboard.json"

EXAMPLES = {
    "base": K8S / "base",
    "small-model": K8S / "examples" / "small-model",
    "tp4": K8S / "examples" / "tp4",
}
SECRET_NAME = "kvmesh-api-keys"
RAY_CONTAINERS = ("ray-head", "ray-worker")
# KubeRay's RayService upgrade types (ray-operator/apis/ray/v1/rayservice_types.go); the CRD
# declares the field as a plain string, so the enum is checked here.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
KUBERNETES_VERSION = "1.33.0"  # for kubernetes-validate


# ---- a tiny kustomize ---------------------------------------------------------------------
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator"}


class RenderError(ValueError):
    pass


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would print (for the features used here)."""
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{kfile}: kustomize features this test does not render: {unknown}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            if not (path / "kustomization.yaml").is_file():
                raise RenderError(f"{kfile}: {entry} is a folder without kustomization.yaml")
            objects.extend(render(path))
        else:
            # kustomize's load restrictor: files must lie inside the kustomization's folder.
            if not _inside(path, directory):
                raise RenderError(f"{kfile}: {entry} is outside {directory}")
            objects.extend(o for o in yaml.safe_load_all(path.read_text()) if o)
    for gen in spec.get("configMapGenerator") or []:
        objects.append(_config_map(directory, gen))
    for image in spec.get("images") or []:
        for obj in objects:
            _set_image(obj, image)
    for patch in spec.get("patches") or []:
        _apply_patch(directory, objects, patch)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise RenderError(f"{kfile}: duplicate objects {dupes}")
    return objects


def _config_map(directory: Path, gen: dict[str, Any]) -> dict[str, Any]:
    unknown = set(gen) - {"name", "files", "options"}
    options = gen.get("options") or {}
    unknown |= set(options) - {"disableNameSuffixHash", "labels"}
    if unknown:
        raise RenderError(f"configMapGenerator: unsupported {unknown}")
    if options.get("disableNameSuffixHash") is not True:
        raise RenderError("configMapGenerator: only disableNameSuffixHash: true is rendered")
    data = {}
    for entry in gen["files"]:
        path = directory / entry
        if not _inside(path, directory):
            raise RenderError(f"configMapGenerator: {entry} is outside {directory}")
        data[path.name] = path.read_text()
    metadata: dict[str, Any] = {"name": gen["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _containers(obj: Any):
    """Every container dict in an object (pod templates anywhere inside it)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _containers(item)


def _set_image(obj: dict[str, Any], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise RenderError(f"images: unsupported {unknown}")
    for container in _containers(obj):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def _apply_patch(directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    unknown = set(patch) - {"target", "patch", "path"}
    target = patch.get("target") or {}
    unknown |= set(target) - {"kind", "name"}
    if unknown or not target:
        raise RenderError(f"patches: unsupported {unknown or 'patch without target'}")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise RenderError("patches: only JSON 6902 patches (a list of operations) are rendered")
    matched = [
        o
        for o in objects
        if o["kind"] == target.get("kind", o["kind"])
        and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
    ]
    if not matched:
        raise RenderError(f"patches: target {target} matches nothing")
    for obj in matched:
        for op in ops:
            json_patch(obj, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} does not start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove, test), in place; errors as kustomize's."""
    kind = op["op"]
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as exc:
            raise RenderError(f"{kind} {op['path']}: no {part!r}") from exc
    if isinstance(node, list):
        if kind == "add" and last == "-":
            node.append(copy.deepcopy(op["value"]))
            return
        index = int(last)
        if not 0 <= index < len(node) + (kind == "add"):
            raise RenderError(f"{kind} {op['path']}: index out of range")
    elif not isinstance(node, dict):
        raise RenderError(f"{kind} {op['path']}: parent is not a container")
    exists = (last in node) if isinstance(node, dict) else index < len(node)
    if kind in ("replace", "remove", "test") and not exists:
        raise RenderError(f"{kind} {op['path']}: nothing there")
    key = last if isinstance(node, dict) else index
    if kind == "add" and isinstance(node, list):
        node.insert(index, copy.deepcopy(op["value"]))
    elif kind in ("add", "replace"):
        node[key] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[key]
    elif kind == "test":
        if node[key] != op["value"]:
            raise RenderError(f"test {op['path']}: {node[key]!r} != {op['value']!r}")
    else:
        raise RenderError(f"JSON patch op {kind!r} is not rendered")


@cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(EXAMPLES[name]))


def rendered(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(name)))


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config_of(example: str) -> dict[str, Any]:
    """The Ray Serve config (``serveConfigV2``) an example deploys."""
    return yaml.safe_load(only(rendered(example), "RayService")["spec"]["serveConfigV2"])


def app_config_of(example: str):
    from kvmesh.cluster.app_config import AppConfig

    (app,) = serve_config_of(example)["applications"]
    return AppConfig.model_validate(app["args"])


# ---- strict CRD validation ----------------------------------------------------------------
def strict(schema: Any) -> Any:
    """A copy where objects with ``properties`` reject other keys (unless the CRD says
    ``x-kubernetes-preserve-unknown-fields``), like the API server's strict validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@cache
def rayservice_validator() -> jsonschema.Draft7Validator:
    vendored = json.loads(SCHEMA_FILE.read_text())
    assert (vendored["group"], vendored["kind"], vendored["version"]) == (
        "ray.io",
        "RayService",
        "v1",
    )
    schema = strict(vendored["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=FORMATS)


def rayservice_errors(obj: dict[str, Any]) -> list[str]:
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in rayservice_validator().iter_errors(obj)
    ]
    if obj.get("apiVersion") != "ray.io/v1" or obj.get("kind") != "RayService":
        errors.append(f"not a ray.io/v1 RayService: {obj.get('apiVersion')} {obj.get('kind')}")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj.get("metadata", {}).get("name", "")):
        errors.append("metadata.name is not a DNS label")
    return errors


# ---- pod-spec helpers ---------------------------------------------------------------------
def cluster(service: dict[str, Any]) -> dict[str, Any]:
    return service["spec"]["rayClusterConfig"]


def pod_templates(service: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    c = cluster(service)
    groups = [("head", c["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in c["workerGroupSpecs"]]
    return groups


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container of each pod template.
    container = template["spec"]["containers"][0]
    assert container["name"] in RAY_CONTAINERS
    return container


def gpus(container: dict[str, Any]) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def gpus_per_replica(model) -> int:
    """GPUs one replica holds: the replica itself is tensor-parallel rank 0 (one GPU),
    ranks 1.. are Ray actors with one GPU each on the same node."""
    tp = model.engine.tensor_parallel_size
    return tp if tp > 1 else int(model.num_gpus + 0.999)


def max_replicas(model) -> int:
    if model.autoscaling is not None:
        return int(model.autoscaling.get("max_replicas", 1))
    return model.replicas


# ---- tests: the renderer and the validator can fail ---------------------------------------
def test_json_patch_rejects_what_kustomize_rejects():
    doc = {"spec": {"items": [1, 2]}}
    json_patch(doc, {"op": "add", "path": "/spec/items/-", "value": 3})
    json_patch(doc, {"op": "replace", "path": "/spec/items/0", "value": 0})
    json_patch(doc, {"op": "remove", "path": "/spec/items/1"})
    assert doc == {"spec": {"items": [0, 3]}}
    for bad in (
        {"op": "replace", "path": "/spec/missing", "value": 1},
        {"op": "replace", "path": "/spec/items/5", "value": 1},
        {"op": "add", "path": "/nope/deeper", "value": 1},
        {"op": "test", "path": "/spec/items/0", "value": 9},
        {"op": "move", "path": "/spec/items/0", "from": "/spec"},
    ):
        with pytest.raises(RenderError):
            json_patch(doc, bad)


def test_render_refuses_unknown_kustomize_features(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [../outside.yaml]\n")
    with pytest.raises(RenderError, match="outside"):
        render(tmp_path)


def test_strict_validator_rejects_misspelt_and_mistyped_fields():
    service = only(rendered("base"), "RayService")
    assert rayservice_errors(service) == []

    misspelt = copy.deepcopy(service)
    misspelt["spec"]["rayClusterConfg"] = misspelt["spec"].pop("rayClusterConfig")
    errors = rayservice_errors(misspelt)
    assert any("rayClusterConfg" in e for e in errors), errors
    assert any("rayClusterConfig" in e and "required" in e for e in errors), errors

    deep = copy.deepcopy(service)
    deep_spec = cluster(deep)["workerGroupSpecs"][0]["template"]["spec"]
    deep_spec["terminationGracePeriodSecond"] = deep_spec.pop("terminationGracePeriodSeconds")
    assert any("terminationGracePeriodSecond" in e for e in rayservice_errors(deep))

    mistyped = copy.deepcopy(service)
    cluster(mistyped)["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert any("maxReplicas" in e for e in rayservice_errors(mistyped))

    too_big = copy.deepcopy(service)
    cluster(too_big)["workerGroupSpecs"][0]["maxReplicas"] = 2**31
    assert any("int32" in e for e in rayservice_errors(too_big))

    quantity = copy.deepcopy(service)
    ray_container(pod_templates(quantity)[1][1])["resources"]["limits"]["memory"] = "24 GiB"
    assert any("memory" in e for e in rayservice_errors(quantity))


# ---- tests: each example ------------------------------------------------------------------
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_rayservice_matches_kuberay_crd(example):
    objects = rendered(example)
    service = only(objects, "RayService")
    assert rayservice_errors(service) == []
    # The API keys are never part of what gets applied from git.
    assert not [o for o in objects if o["kind"] == "Secret"]


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_serve_config_is_a_valid_kvmesh_app(example):
    from ray.serve.schema import ServeDeploySchema

    from kvmesh.cluster.serve_cmd import check_serve_config, serve_config

    data = serve_config_of(example)
    assert check_serve_config(data) == []
    ServeDeploySchema.model_validate(data)
    config = app_config_of(example)  # strict AppConfig
    assert not config.api_keys and config.api_keys_file is None  # keys come from the Secret
    # Exactly what `kvmesh build-config` writes for these args: no hand-edited drift.
    assert serve_config(config) == data
    # KubeRay's serve Service and probes talk to Serve on 0.0.0.0:8000.
    assert data["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert data["proxy_location"] == "EveryNode"


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_cluster_fits_the_app(example):
    service = only(rendered(example), "RayService")
    spec = service["spec"]
    config = app_config_of(example)
    c = cluster(service)

    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    assert spec["upgradeStrategy"]["type"] == "NewCluster"  # zero-downtime upgrades
    assert c["enableInTreeAutoscaling"] is True
    assert c["rayVersion"] == _ray_version()
    head = c["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0", "dashboard-host": "0.0.0.0"}
    for group in c["workerGroupSpecs"]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())

    # Drains: a removed replica gets its graceful_shutdown_timeout_s, and so does the old
    # cluster after an upgrade switched traffic away from it.
    drain = max(m.graceful_shutdown_timeout_s for m in config.models)
    assert spec["rayClusterDeletionDelaySeconds"] >= drain
    for group, template in pod_templates(service):
        pod = template["spec"]
        container = ray_container(template)
        assert pod["terminationGracePeriodSeconds"] >= max(drain, 300) + 15, group
        assert container["lifecycle"]["preStop"]["exec"]["command"] == [
            "/usr/local/bin/kvmesh-drain"
        ]
        assert container["image"].split(":")[0] == "kvmesh", group
        # KubeRay's own probes (raylet + Serve proxy health) decide readiness.
        assert "readinessProbe" not in container and "livenessProbe" not in container, group
        assert pod["securityContext"]["runAsNonRoot"] is True

        env = {e["name"]: e for e in container["env"]}
        assert env["KVMESH_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET_NAME,
            "key": "api-keys",
        }
        assert "value" not in env["KVMESH_API_KEYS"]
        for name, value in SERVE_PROCESS_ENV.items():  # as `kvmesh serve` starts Ray
            assert env[name]["value"] == value, (group, name)
        cache_dir = env["KVMESH_CACHE"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"] for v in pod["volumes"]}
        assert mounts[cache_dir] in volumes, group
        assert set(mounts.values()) <= volumes, group

        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == config.port, group
        resources = container["resources"]
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get(
            "nvidia.com/gpu"
        ), group
    assert gpus(ray_container(head["template"])) == 0

    # GPUs: a replica fits on one worker pod, and the worker group can hold the largest fleet.
    workers = c["workerGroupSpecs"]
    assert len(workers) == 1
    worker = workers[0]
    per_pod = gpus(ray_container(worker["template"]))
    assert per_pod >= 1
    assert worker["minReplicas"] <= worker.get("replicas", worker["minReplicas"])
    assert worker["minReplicas"] <= worker["maxReplicas"]
    needed_pods = 0
    for model in config.models:
        need = gpus_per_replica(model)
        if model.engine.tensor_parallel_size > 1:
            assert model.num_gpus == 1.0, "a tensor-parallel replica is rank 0: one GPU"
        assert need <= per_pod, f"{model.name}: {need} GPUs per replica, {per_pod} per pod"
        needed_pods += -(-max_replicas(model) * need // per_pod)
    assert needed_pods <= worker["maxReplicas"]


def test_small_model_autoscales_one_to_four():
    (model,) = app_config_of("small-model").models
    assert model.autoscaling is not None
    assert model.autoscaling.get("policy", "kvmesh") == "kvmesh"
    assert (model.autoscaling["min_replicas"], model.autoscaling["max_replicas"]) == (1, 4)
    assert model.num_gpus == 1.0 and model.engine.model is None  # the embedded SmolLM2
    worker = cluster(only(rendered("small-model"), "RayService"))["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 4)


def test_tp4_workers_hold_one_tensor_parallel_replica():
    (model,) = app_config_of("tp4").models
    assert model.engine.tensor_parallel_size == 4
    assert model.engine.model and model.engine.model.startswith("/models/")
    worker = cluster(only(rendered("tp4"), "RayService"))["workerGroupSpecs"][0]
    container = ray_container(worker["template"])
    assert gpus(container) == 4
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "kvmesh-models"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # NCCL's shared memory


def test_tp4_replica_reserves_its_ranks():
    from kvmesh.cluster.app import model_deployment_options

    config = app_config_of("tp4")
    (model,) = config.models
    options = model_deployment_options(model, config.name)
    bundles = options.get("placement_group_bundles")
    assert bundles is not None and len(bundles) == model.engine.tensor_parallel_size
    assert all(b.get("GPU") == 1 for b in bundles)
    assert options.get("placement_group_strategy") == "STRICT_PACK"


# ---- tests: monitoring, Secret, Dockerfile ------------------------------------------------
def test_dashboard_copy_is_the_repository_dashboard():
    copy_path = K8S / "monitoring" / DASHBOARD.name
    assert copy_path.read_bytes() == DASHBOARD.read_bytes(), (
        f"cp {DASHBOARD.relative_to(REPO)} {copy_path.relative_to(REPO)}"
    )
    config_map = only(render(K8S / "monitoring"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())


def _secret_example() -> dict[str, Any]:
    return yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())


def test_secret_example_has_the_keys_the_pods_and_prometheus_read():
    from kvmesh.router.auth import check_api_key

    secret = _secret_example()
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    data = secret["stringData"]
    keys = [check_api_key(k.strip(), "api-keys") for k in data["api-keys"].split(",")]
    assert data["metrics-key"] in keys  # Prometheus' bearer token must be accepted


@pytest.mark.parametrize("example", ["small-model", "tp4"])
def test_pod_monitor_scrapes_the_head_serve_port_with_the_secret(example):
    objects = rendered(example)
    monitor = only(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    service = only(objects, "RayService")
    # Scraped once, through the head's Serve proxy: the ingress merges every replica's metrics.
    selected = [
        (group, t)
        for group, t in pod_templates(service)
        if selector["matchLabels"].items() <= t["metadata"]["labels"].items()
    ]
    assert [group for group, _ in selected] == ["head"]
    ports = {p["name"] for p in ray_container(selected[0][1])["ports"]}
    secret_keys = set(_secret_example()["stringData"])
    endpoint_keys = {"port", "path", "scheme", "interval", "scrapeTimeout", "authorization"}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= endpoint_keys
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
        auth = endpoint["authorization"]
        assert set(auth) == {"type", "credentials"} and auth["type"] == "Bearer"
        assert set(auth["credentials"]) == {"name", "key"}
        assert auth["credentials"]["name"] == SECRET_NAME
        assert auth["credentials"]["key"] in secret_keys


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_objects_have_kubernetes_identity(example):
    for obj in rendered(example):
        assert obj["apiVersion"] and obj["kind"]
        name = obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 63
        assert "namespace" not in obj["metadata"]  # `kubectl -n` / an overlay decides


def test_core_objects_match_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [_secret_example(), *render(K8S / "monitoring")]
    for example in EXAMPLES:
        service = only(rendered(example), "RayService")
        for group, template in pod_templates(service):
            core.append(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{example}-{group}"},
                    "template": template,
                }
            )
    for obj in core:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked structurally above
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # ... and it can fail: a misspelt container field.
    bad = copy.deepcopy(core[-1])
    bad["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def _ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def test_dockerfile_basics():
    text = (K8S / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms == [f"rayproject/ray:{_ray_version()}-py311-gpu"]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # No credentials baked into the image.
    assert not re.search(r"(?im)^\s*(ENV|ARG)\s+\S*(KEY|TOKEN|SECRET|PASSWORD)", text)
    assert "KVMESH_API_KEYS" not in text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installed = set(re.findall(r"kvmesh-src\[([a-z0-9_,-]+)\]", text))
    assert installed == {"triton"} and "triton" in extras
    cache_dir = re.search(r"(?m)^ENV KVMESH_CACHE=(\S+)", text).group(1)
    assert f"chown ray:users {cache_dir}" in text
    for example in EXAMPLES:
        for _, template in pod_templates(only(rendered(example), "RayService")):
            env = {e["name"]: e.get("value") for e in ray_container(template)["env"]}
            assert env["KVMESH_CACHE"] == cache_dir
    # Every file the Dockerfile copies from k8s/ exists.
    for src in re.findall(r"(?m)^COPY\s+(?:--\S+\s+)*(k8s/\S+)", text):
        assert (REPO / src).is_file(), src


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_drain_script_parses_and_waits_at_most_its_deadline():
    script = K8S / "kvmesh-drain.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {"PATH": "/usr/bin:/bin", "KVMESH_RAY_NODE": "head", "KVMESH_DRAIN_S": "0"}
    done = subprocess.run(["bash", str(script)], env=env, timeout=30)
    assert done.returncode == 0


# ---- the manifest's app, deployed as is -----------------------------------------------------
DEPLOYABLE_HERE = ("small-model", "base")  # tp4 names a 32B checkpoint this machine lacks


@pytest.mark.slow
def test_serve_config_deploys_as_is_on_a_local_ray_cluster(tmp_path):
    """Each example's ``serveConfigV2`` string, byte for byte, goes to a real Ray head node
    through Ray's own ``serve deploy`` (the dashboard API KubeRay uses) and serves a request.

    The head declares the one GPU a worker pod would have (``--num-gpus 1``): Ray schedules
    the GPU replica on it; without CUDA here, the engine's ``device: auto`` runs it on the CPU.
    """
    import socket

    import httpx
    from ray_nodes import BIN, RayNodes

    with socket.socket() as s:  # the manifest fixes Serve's port: 8000 must be free
        try:
            s.bind(("0.0.0.0", 8000))
        except OSError:
            pytest.fail("port 8000 is in use; this test deploys the manifest's port as is")
    nodes = RayNodes()
    try:
        nodes.start_head(num_cpus=3, num_gpus=1)
        for example in DEPLOYABLE_HERE:
            path = tmp_path / f"{example}.yaml"
            path.write_text(only(rendered(example), "RayService")["spec"]["serveConfigV2"])
            deployed = subprocess.run(
                [str(BIN / "serve"), "deploy", str(path), "--address", nodes.dashboard],
                env=nodes.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            model = app_config_of(example).models[0].name
            deadline = time.monotonic() + 600
            while True:
                app = nodes.serve_details()["applications"].get("kvmesh") or {}
                assert app.get("status") != "DEPLOY_FAILED", app.get("message")
                try:
                    ready = httpx.get("http://127.0.0.1:8000/ready", timeout=5)
                    if ready.status_code == 200 and app.get("status") == "RUNNING":
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{example}: {app.get('status')}"
                time.sleep(1)
            body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8}
            r = httpx.post("http://127.0.0.1:8000/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
            assert r.headers["x-kvmesh-replica"].startswith(f"{model}#")
    finally:
        nodes.shutdown()
