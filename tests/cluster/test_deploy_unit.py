"""``kvmesh deploy`` / ``down`` without a cluster: what they send, and the config they check.

(The real thing, against real Ray nodes, is in test_two_nodes.py and test_ray_up.py.)
"""

from __future__ import annotations

import pytest

from kvmesh.cluster import deploy
from kvmesh.cluster.app import HEAD_NODE_RESOURCE, build_app, model_deployment_options
from kvmesh.cluster.app_config import AppConfig
from kvmesh.cluster.serve_cmd import serve_config


def _details(*names: str) -> dict:
    """Serve's /api/serve/applications/ answer, reduced to what deploy reads."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": {
            n: {"status": "RUNNING", "deployed_app_config": {"name": n, "import_path": f"{n}:app"}}
            for n in names
        },
    }


def test_deploy_keeps_other_apps_and_replaces_its_own():
    ours = serve_config(AppConfig())
    merged = deploy.merged_config(_details("other", "kvmesh"), ours)
    names = [a["name"] for a in merged["applications"]]
    assert sorted(names) == ["kvmesh", "other"]
    assert merged["applications"][-1] == ours["applications"][0]  # ours, not the old one
    assert merged["proxy_location"] == ours["proxy_location"]


def test_down_keeps_the_others_or_deletes_all_when_none_is_left():
    rest = deploy.remaining_config(_details("other", "kvmesh"), {"kvmesh"})
    assert [a["name"] for a in rest["applications"]] == ["other"]
    assert rest["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert deploy.remaining_config(_details("kvmesh"), {"kvmesh"}) is None


def test_dashboard_address_refuses_a_gcs_address(monkeypatch):
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ValueError, match=r"not a dashboard address.*8265"):
        deploy.dashboard_address()
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert deploy.dashboard_address() == "http://10.0.0.1:8265"
    assert deploy.dashboard_address("https://ray.example:443") == "https://ray.example:443"


def test_app_url_is_the_heads_host_and_serves_port():
    config = serve_config(AppConfig(port=8100, route_prefix="/llm"))
    assert deploy.app_url("http://10.0.0.1:8265", config, "/llm") == "http://10.0.0.1:8100/llm"


def test_invalid_serve_config_is_refused_before_anything_is_sent():
    bad = serve_config(AppConfig())
    bad["applications"][0]["args"]["models"] = [{"name": "m", "replica": 2}]
    with pytest.raises(ValueError, match="replica"):
        deploy.deploy(bad, "http://127.0.0.1:1")


def test_max_replicas_per_node_reaches_serve_and_refuses_tensor_parallel():
    m = AppConfig.model_validate({"models": [{"name": "m", "max_replicas_per_node": 1}]}).models[0]
    assert model_deployment_options(m, "kvmesh")["max_replicas_per_node"] == 1
    with pytest.raises(ValueError, match="max_replicas_per_node does not combine"):
        AppConfig.model_validate(
            {
                "models": [
                    {
                        "name": "m",
                        "max_replicas_per_node": 1,
                        "engine": {"tensor_parallel_size": 2},
                    }
                ]
            }
        )


def test_ingress_on_head_pins_ingress_and_stats_hub_to_the_head():
    app = build_app(AppConfig(ingress_on_head=True, proxy_location="HeadOnly"))
    ingress = app._bound_deployment
    hub = ingress.init_args[2]._bound_deployment
    assert hub.name == "kvmesh-stats"
    for d in (ingress, hub):
        assert d.ray_actor_options["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    assert serve_config(AppConfig(proxy_location="HeadOnly"))["proxy_location"] == "HeadOnly"
