"""The ingress's pieces on their own: schemas, errors, auth, alias split, cache, metrics merge."""

from __future__ import annotations

import collections
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from kvmesh import SamplingParams
from kvmesh.cluster.app_config import AppConfig
from kvmesh.replicas.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvmesh.replicas.replica_metrics import ReplicaMetrics
from kvmesh.router.auth import APIKeyAuth, keys_from_env, keys_from_file
from kvmesh.router.errors import APIError, from_validation_error
from kvmesh.router.ingress_metrics import IngressMetrics, merge_expositions
from kvmesh.router.model_table import ModelTable
from kvmesh.router.protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.router.response_cache import Generation, ResponseCache, cache_key


def error_for(schema, body: str) -> APIError:
    with pytest.raises(ValidationError) as info:
        schema.model_validate_json(body)
    return from_validation_error(info.value)


def test_completion_request_maps_to_sampling_params():
    req = CompletionRequest.model_validate_json(
        '{"model": "m", "prompt": [1, 2, 3], "temperature": 0, "top_k": 5, "stop": ["x"],'
        ' "seed": 3, "logprobs": 2, "ignore_eos": true, "min_tokens": 2}'
    )
    sp = req.sampling_params()
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.stop, sp.seed) == (16, 0.0, 5, ["x"], 3)
    assert (sp.logprobs, sp.ignore_eos, sp.min_tokens) == (2, True, 2)
    assert req.prompts() == [[1, 2, 3]] and req.deterministic
    batch = CompletionRequest.model_validate_json('{"model": "m", "prompt": ["a", "b"]}')
    assert batch.prompts() == ["a", "b"] and not batch.deterministic


def test_chat_request_defaults_and_limits():
    req = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
        ' {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "max_tokens": 99,'
        ' "logprobs": true, "top_logprobs": 3}'
    )
    sp = req.sampling_params()
    assert sp.max_tokens == 7 and sp.logprobs == 3 and sp.temperature == 1.0
    assert req.conversation() == [{"role": "user", "content": "ab"}]
    unlimited = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    )
    assert unlimited.sampling_params().max_tokens is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ('{"model": "m", "prompt": "x", "max_tokens": 1.5}', "max_tokens", "integer"),
        ('{"model": "m", "prompt": "x", "stream": 1}', "stream", "boolean"),
        ('{"model": "m", "prompt": [0, -1]}', "prompt[1]", "greater than"),
        ('{"model": "m", "prompt": "x", "n": 3}', "n", "n=1"),
        ('{"model": "m", "prompt": "x", "top_k": 0}', "top_k", "-1"),
        ('{"prompt": "x"}', "model", "required"),
        ('{"model": "m", "prompt": "x", "logprobs": 21}', "logprobs", "less than"),
    ],
)
def test_validation_errors_name_the_field(body, param, words):
    err = error_for(CompletionRequest, body)
    assert err.status == 400 and err.param == param
    assert words in err.message and err.body()["error"]["type"] == "invalid_request_error"


def test_api_errors_carry_openai_body_and_retry_after():
    err = APIError(429, "slow down", code="overloaded", retry_after_s=2)
    assert err.body() == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert err.headers() == {"Retry-After": "2"}


def test_api_keys_are_optional_and_checked():
    APIKeyAuth([]).check(None)  # open
    k1, k2, k3 = (f"key-{i}-abcdefghijklmnop" for i in (1, 2, 3))
    auth = APIKeyAuth([k1, k2])
    auth.check(f"Bearer {k2}")
    for header in (None, "", "Bearer", f"Bearer {k3}", f"Basic {k1}", k1, "Bearer "):
        with pytest.raises(APIError) as info:
            auth.check(header)
        assert info.value.status == 401


@pytest.mark.parametrize("key", ["", "short", " padded-key-0123456789 ", "x" * 15])
def test_short_or_padded_api_keys_are_refused_at_load(key, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="at least 16 characters") as info:
        APIKeyAuth([key])
    assert key.strip() not in str(info.value) or not key.strip()  # the key is never echoed
    with pytest.raises(ValueError, match="api_keys"):
        AppConfig.model_validate({"api_keys": [key]})
    short = key.strip()
    if len(short) >= 16:
        return  # env and key files strip surrounding spaces: a padded key is fine there
    monkeypatch.setenv("KVMESH_API_KEYS", f"good-key-0123456789,{short or 'x'}")
    with pytest.raises(ValueError, match="KVMESH_API_KEYS"):
        keys_from_env()
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"good-key-0123456789\n{short or 'y'}\n")
    with pytest.raises(ValueError, match="api_keys_file"):
        keys_from_file(str(keyfile))


def test_build_config_never_writes_api_keys():
    from kvmesh.cluster.serve_cmd import check_serve_config, serve_config

    with pytest.raises(ValueError, match="KVMESH_API_KEYS"):
        serve_config(AppConfig.model_validate({"api_keys": ["secret-key-0123456789"]}))
    data = serve_config(AppConfig.model_validate({"api_keys_file": "/etc/kvmesh/keys"}))
    assert data["applications"][0]["args"]["api_keys_file"] == "/etc/kvmesh/keys"
    data["applications"][0]["args"]["api_keys"] = ["secret-key-0123456789"]
    assert any("api_keys" in p for p in check_serve_config(data))


def test_response_cache_is_bounded_in_bytes():
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    cache = ResponseCache(1000, max_bytes=200_000)
    for i in range(50):
        cache.put(
            cache_key("m", [i] * 1000, sp), Generation(text="x" * 10_000, finish_reason="stop")
        )
        assert cache.num_bytes <= cache.max_bytes
    assert 0 < len(cache) < 50
    assert cache.get(cache_key("m", [49] * 1000, sp)) is not None  # the newest stays
    cache.put(cache_key("m", [7], sp), Generation(text="x" * 10**6, finish_reason="stop"))
    assert cache.get(cache_key("m", [7], sp)) is None  # larger than the whole cache: not kept


def test_alias_split_follows_weights_and_unknown_is_404():
    table = ModelTable(["a", "b"], {"ab": {"a": 3, "b": 1}}, rng=random.Random(0))
    counts = collections.Counter(table.resolve("ab") for _ in range(4000))
    assert 0.72 < counts["a"] / 4000 < 0.78
    assert table.resolve("b") == "b" and table.names() == ["a", "b", "ab"]
    with pytest.raises(APIError) as info:
        table.resolve("c")
    assert info.value.status == 404 and info.value.param == "model"
    with pytest.raises(ValueError, match="unknown models"):
        ModelTable(["a"], {"x": {"zz": 1}})


def test_response_cache_is_a_bounded_lru_of_finished_generations():
    cache = ResponseCache(2)
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    k1, k2, k3 = (cache_key("m", [i], sp) for i in (1, 2, 3))
    assert cache_key("m", [1], sp) == k1 != cache_key("m2", [1], sp)
    assert cache_key("m", [1], SamplingParams(temperature=0.0, max_tokens=5)) != k1
    cache.put(k1, Generation(text="one", finish_reason="length"))
    cache.put(k2, Generation(text="two", finish_reason="stop"))
    assert cache.get(k1).text == "one"  # k1 is now most recent
    cache.put(k3, Generation(text="three", finish_reason="stop"))
    assert cache.get(k2) is None and cache.get(k3).text == "three" and len(cache) == 2
    cache.put(cache_key("m", [9], sp), Generation(finish_reason="abort"))
    assert len(cache) == 2  # unfinished generations are not kept


def _finished(ttft: float, n: int) -> RequestOutput:
    times = [10.0 + ttft + 0.02 * i for i in range(n)]
    metrics = RequestMetrics(
        arrival_time=10.0, first_token_time=times[0], finished_time=times[-1], token_times=times
    )
    out = CompletionOutput(0, "x", list(range(n)), finish_reason="length")
    return RequestOutput("r", None, [1, 2], [out], True, metrics)


def test_replica_metrics_merge_into_one_valid_exposition():
    stats = {
        "num_requests_running": 3,
        "num_requests_waiting": 1,
        "kv_cache_usage": 0.25,
        "kv_blocks_free": 30,
        "kv_blocks_total": 40,
        "prompt_tokens": 100,
        "generation_tokens": 50,
        "prefix_cache_queries": 100,
        "prefix_cache_hits": 16,
        "num_preemptions": 0,
    }
    texts = []
    for replica in ("m#a", "m#b"):
        metrics = ReplicaMetrics("m", replica)
        metrics.observe_finished(_finished(0.05, 5))
        texts.append(metrics.render(stats))
    ingress = IngressMetrics()
    ingress.overhead.labels("m", "engine_to_sse").observe(0.002)
    merged = merge_expositions([ingress.render(), *texts])
    assert merged.count("# TYPE kvmesh:num_requests_running gauge") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    running = families["kvmesh:num_requests_running"].samples
    assert {s.labels["replica"] for s in running} == {"m#a", "m#b"}
    assert sum(s.value for s in running) == 6
    prompt = families["kvmesh:prompt_tokens"].samples
    assert {s.name for s in prompt} == {"kvmesh:prompt_tokens_total"}
    itl = families["kvmesh:inter_token_latency_seconds"].samples
    assert sum(s.value for s in itl if s.name.endswith("_count")) == 8  # 4 gaps per request
    ttft_sum = [
        s for s in families["kvmesh:time_to_first_token_seconds"].samples if s.name.endswith("_sum")
    ]
    assert all(s.value == pytest.approx(0.05) for s in ttft_sum)
    assert "kvmesh:serving_overhead_seconds" in families
