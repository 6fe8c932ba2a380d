"""Config files, build-config and the CLI's parsing: strict, and valid for Ray Serve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kvmesh.cluster.app_config import AppConfig, deployment_name, load_config
from kvmesh.cluster.cli import build_parser
from kvmesh.cluster.serve_cmd import (
    check_serve_config,
    config_from_args,
    engine_threads_per_replica,
    serve_config,
    threads_per_replica,
    unknown_keys,
    write_serve_config,
)

EXAMPLES = sorted(Path(__file__).parents[2].joinpath("configs").glob("serve_*.yaml"))


def test_example_configs_load_and_build_valid_serve_configs(tmp_path):
    assert EXAMPLES, "configs/serve_*.yaml missing"
    for path in EXAMPLES:
        config = load_config(path)
        out = tmp_path / f"{path.stem}.serve.yaml"
        write_serve_config(config, out)
        data = yaml.safe_load(out.read_text())
        assert check_serve_config(data) == []
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(data)
        assert schema.applications[0].import_path == "kvmesh.cluster.app:app_builder"
        # The args round-trip to the same app.
        assert AppConfig.model_validate(data["applications"][0]["args"]) == config


def test_bare_names_find_the_shipped_examples():
    assert load_config("serve_canary").aliases[0].name == "smollm2"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"modles": []}, "modles"),
        ({"models": [{"name": "m", "replica": 2}]}, "replica"),
        ({"models": [{"name": "m", "engine": {"max_num_seq": 4}}]}, "max_num_seq"),
        ({"models": [{"name": "m", "autoscaling": {"max_replica": 4}}]}, "max_replica"),
        (
            {
                "models": [
                    {
                        "name": "m",
                        "request_router": "prefix_aware",
                        "router_options": {"miss_wieght": 1},
                    }
                ]
            },
            "miss_wieght",
        ),
        ({"limits": {"max_request_byte": 5}}, "max_request_byte"),
        ({"port": "8000"}, "port"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        ({"aliases": [{"name": "x", "weights": {"nope": 1}}]}, "unknown models"),
        ({"aliases": [{"name": "x", "weights": {"SmolLM2-135M-Instruct": 0}}]}, "positive"),
        ({"models": [{"name": "m", "request_router": "fastest"}]}, "request_router"),
    ],
)
def test_config_errors_name_the_offending_key(tmp_path, data, where):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=where):
        load_config(path)


def test_unknown_keys_in_a_serve_config_are_found():
    data = serve_config(AppConfig())
    assert unknown_keys(data, __import__("ray.serve.schema").serve.schema.ServeDeploySchema) == []
    data["http_options"]["hots"] = "0.0.0.0"
    data["applications"][0]["deployments"] = [{"name": "x", "num_replica": 2}]
    data["applications"][0]["args"]["modles"] = []
    problems = check_serve_config(data)
    assert "unknown key: http_options.hots" in problems
    assert "unknown key: applications[0].deployments[0].num_replica" in problems
    assert any("modles" in p for p in problems)


def test_flags_override_the_file_and_split_cores():
    config = config_from_args(None, "/models/my-llm", 2, "0.0.0.0", 9000)
    (m,) = config.models
    assert (m.name, m.engine.model, m.replicas) == ("my-llm", "/models/my-llm", 2)
    assert (config.host, config.port, config.url) == ("0.0.0.0", 9000, "http://0.0.0.0:9000")
    cpus = os.cpu_count() or 1
    assert m.num_cpus == threads_per_replica(cpus, 2) and m.num_cpus >= 1
    # Ray keeps a CPU for Serve's actors; the engines still get every core.
    assert threads_per_replica(2, 1) == 1 and threads_per_replica(16, 2) == 7
    assert engine_threads_per_replica(2, 1) == 2 and engine_threads_per_replica(16, 2) == 8
    assert engine_threads_per_replica(1, 1) == 1 and engine_threads_per_replica(4, 8) == 1
    assert m.torch_threads == engine_threads_per_replica(cpus, 2)
    assert m.replica_options(config)["torch_threads"] == m.torch_threads
    assert m.torch_threads_burst is None
    canary = config_from_args(str(EXAMPLES[0].parent / "serve_canary.yaml"), None, 3)
    assert [m.replicas for m in canary.models] == [3, 3]
    with pytest.raises(ValueError, match="exactly one model"):
        config_from_args(str(EXAMPLES[0].parent / "serve_canary.yaml"), "/m", None)
    routed = config_from_args(None, None, 2, router="prefix_aware")
    assert routed.models[0].prefix_aware
    with pytest.raises(ValueError, match="request_router"):
        config_from_args(None, None, 2, router="nearest")
    # A deploy to another cluster does not size replicas by this machine's cores.
    remote = config_from_args(None, None, 2, split_local_cores=False)
    assert remote.models[0].num_cpus == 1.0 and remote.models[0].torch_threads is None
    assert remote.models[0].torch_threads_burst is None


def test_router_default_is_prefix_aware_wherever_there_is_a_choice(tmp_path):
    """Issue #15: `kvmesh serve --replicas 2` used to route with Serve's power of two."""
    power = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
    one, two = config_from_args(None, None, 1), config_from_args(None, None, 2)
    assert one.models[0].router_class == power and not one.models[0].prefix_aware
    assert two.models[0].prefix_aware
    # The shipped one-replica config, scaled by the flag, and an autoscaled model.
    assert (
        config_from_args(str(EXAMPLES[0].parent / "serve_default.yaml"), None, 2)
        .models[0]
        .prefix_aware
    )
    scaled = AppConfig.model_validate(
        {"models": [{"name": "m", "autoscaling": {"min_replicas": 1, "max_replicas": 3}}]}
    )
    assert scaled.models[0].prefix_aware
    # The prefix-aware router hashes blocks as the engine does, whoever chose it.
    assert two.models[0].router_kwargs()["block_size"] == two.models[0].engine.block_size
    # Named explicitly, a router is kept at any replica count; the flag overrides the file.
    kept = config_from_args(None, None, 2, router="power_of_two")
    assert kept.models[0].router_class == power
    path = tmp_path / "p2.yaml"
    path.write_text(
        yaml.safe_dump({"models": [{"name": "m", "replicas": 4, "request_router": "round_robin"}]})
    )
    assert load_config(path).models[0].router_class.endswith("RoundRobinRequestRouter")
    assert config_from_args(str(path), None, None, router="prefix_aware").models[0].prefix_aware
    # Options for kvmesh's router on a one-replica model would silently go to Serve's power
    # of two: a clear error instead; with the router named, or a choice to make, they apply.
    options = {"queue_weight": 0.5}
    with pytest.raises(ValueError, match=r"router_options are set but .*power_of_two"):
        AppConfig.model_validate({"models": [{"name": "m", "router_options": options}]})
    for extra in ({"request_router": "prefix_aware"}, {"replicas": 2}):
        model = AppConfig.model_validate(
            {"models": [{"name": "m", "router_options": options, **extra}]}
        ).models[0]
        assert model.prefix_aware and model.router_kwargs()["queue_weight"] == 0.5


def test_deployment_names_are_safe_for_serve():
    assert deployment_name("org/model:v2") == "model-org_model_v2"


def test_cli_parses_the_new_commands():
    parser = build_parser()
    args = parser.parse_args(["serve", "--replicas", "2", "--port", "8001"])
    assert (args.command, args.replicas, args.port, args.host) == ("serve", 2, 8001, None)
    args = parser.parse_args(["build-config", "--config", "x.yaml", "-o", "out.yaml"])
    assert (args.config, args.output) == ("x.yaml", "out.yaml")
    args = parser.parse_args(["bench", "serve", "--concurrency", "1,8", "--workload", "mixed"])
    assert (args.concurrency, args.workload) == ("1,8", "mixed")
