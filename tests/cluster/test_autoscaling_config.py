"""``models[].autoscaling``: kvmesh's knobs to the policy, Serve's to Serve, mistakes refused."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from kvmesh.cluster.app import model_deployment_options
from kvmesh.cluster.app_config import AUTOSCALED_DRAIN_S, AppConfig
from kvmesh.cluster.autoscaling import ServeAutoscalingPolicy
from kvmesh.cluster.serve_cmd import check_serve_config, serve_config


def model(**autoscaling) -> AppConfig:
    return AppConfig.model_validate({"models": [{"name": "m", "autoscaling": autoscaling}]})


def test_kvmesh_policy_by_default_with_serve_passing_decisions_through():
    config = model(min_replicas=1, max_replicas=4, target_queue_s=1.5, look_back_period_s=8)
    serve = model_deployment_options(config.models[0], "app")["autoscaling_config"]
    assert serve["policy"]["policy_function"] == "kvmesh.cluster.autoscaling:ServeAutoscalingPolicy"
    kwargs = serve["policy"]["policy_kwargs"]
    assert kwargs == {
        "model": "m",
        "app": "app",
        "min_replicas": 1,
        "max_replicas": 4,
        "target_queue_s": 1.5,
    }
    # Serve's windows and bounds stay Serve's; its delays are off (the policy has its own).
    assert serve["look_back_period_s"] == 8 and serve["metrics_interval_s"] == 1.0
    assert serve["upscale_delay_s"] == serve["downscale_delay_s"] == 0.0
    with pytest.warns(DeprecationWarning):  # metrics_interval_s: what replicas still read
        AutoscalingConfig(**serve)
    # The policy Serve will build from it.
    policy = ServeAutoscalingPolicy(**kwargs)
    assert policy.autoscaler.config.target_queue_s == 1.5


def test_an_autoscaled_model_drains_long_streams_before_a_replica_stops():
    assert model(max_replicas=2).models[0].graceful_shutdown_timeout_s == AUTOSCALED_DRAIN_S
    explicit = AppConfig.model_validate(
        {"models": [{"name": "m", "autoscaling": {}, "graceful_shutdown_timeout_s": 45.0}]}
    )
    assert explicit.models[0].graceful_shutdown_timeout_s == 45.0


@pytest.mark.parametrize(
    "autoscaling, words",
    [
        ({"target_ongoing_requests": 4}, "target_queue_s"),
        ({"upscale_delay_s": 10}, "up_window_s"),
        ({"downscale_delay_s": 10}, "down_window_s"),
        ({"target_qeue_s": 1}, "unknown autoscaling keys: target_qeue_s"),
        ({"down_utilization": 0.9}, "flap"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"policy": "keda"}, "policy"),
        ({"policy": "serve", "target_queue_s": 1}, "unknown autoscaling keys"),
    ],
)
def test_mistakes_are_refused_with_what_to_use(autoscaling, words):
    with pytest.raises(ValueError, match=words):
        model(**autoscaling)


def test_serve_policy_passes_serve_keys_through():
    config = model(policy="serve", max_replicas=3, target_ongoing_requests=8, upscale_delay_s=5)
    serve = model_deployment_options(config.models[0], "app")["autoscaling_config"]
    assert serve == {"max_replicas": 3, "target_ongoing_requests": 8, "upscale_delay_s": 5}


def test_build_config_writes_a_valid_serve_config_with_the_policy():
    config = model(min_replicas=1, max_replicas=3)
    data = serve_config(config)
    assert check_serve_config(data) == []
    (app,) = data["applications"]
    assert app["args"]["models"][0]["autoscaling"] == {"min_replicas": 1, "max_replicas": 3}
