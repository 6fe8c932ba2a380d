"""The ingress -> replica transport: Serve's gRPC channel (the default, which every other
serving test runs on) and Ray object refs (``replica_transport: object_ref``) serve the same
tokens, streamed and not, and the config refuses an unknown transport."""

from __future__ import annotations

import copy

import openai
import pytest
from kvmesh_testing import wait_until_ok
from pydantic import ValidationError

from kvmesh.cluster.app_config import AppConfig

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, in a small village,"


def object_ref_config(base: dict) -> AppConfig:
    """The session app's ``tiny`` model alone, as a second app on ``/objref``."""
    config = copy.deepcopy(base)
    (tiny,) = [m for m in config["models"] if m["name"] == "tiny"]
    tiny.update(replicas=1, request_router="power_of_two")
    tiny.pop("router_options", None)
    config.update(
        name="kvmesh-objref",
        route_prefix="/objref",
        models=[tiny],
        aliases=[],
        response_cache={"enabled": False},
        replica_transport="object_ref",
    )
    return AppConfig.model_validate(config)


def test_object_ref_transport_serves_the_same_tokens(serve_app):
    from ray import serve

    from kvmesh.cluster.app import build_app

    config = object_ref_config(serve_app.config)
    assert config.ingress_config()["replica_transport"] == "object_ref"
    serve.run(build_app(config), name=config.name, route_prefix="/objref", blocking=False)
    try:
        wait_until_ok(f"{serve_app.url}/objref/ready", timeout_s=180)
        results = {}
        for prefix in ("", "/objref"):
            oai = openai.OpenAI(
                base_url=f"{serve_app.url}{prefix}/v1", api_key=serve_app.api_key, timeout=60
            )
            kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
            whole = oai.completions.create(**kwargs)
            chunks = list(oai.completions.create(stream=True, **kwargs))
            streamed = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            results[prefix] = (whole.choices[0].text, streamed, finish)
        grpc, object_ref = results[""], results["/objref"]
        assert grpc[0] == grpc[1] and grpc[0]  # streamed == whole, and not empty
        assert object_ref == grpc
    finally:
        serve.delete(config.name)


def test_unknown_transport_is_refused():
    with pytest.raises(ValidationError, match="replica_transport"):
        AppConfig.model_validate({"replica_transport": "carrier-pigeon"})
