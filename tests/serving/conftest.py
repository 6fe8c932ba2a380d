"""One real Ray Serve app on 127.0.0.1, shared by every serving test.

Starting Ray (~10 s) and an app (~7 s plus model loads) dominates the cost of these tests, so
the whole module shares one cluster and one app. The models are tiny random llamas with
SmolLM2's vocabulary and tokenizer files: real tokenisation and chat templates, real weights
through the real engine, milliseconds per step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from kvmesh_testing import free_port, wait_until_ok

API_KEY = "test-key-0123456789"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_CHAT = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
ENGINE = dict(block_size=16, num_kv_blocks=512, max_num_seqs=32, max_model_len=4096)


def _with_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file() and not (model_dir / name).exists():
            shutil.copy(src, model_dir / name)
    return model_dir


@pytest.fixture(scope="session")
def tiny_chat_models(make_tiny_model, smollm2_dir) -> tuple[Path, Path]:
    """Two tiny llamas (different seeds) that tokenise like SmolLM2."""
    a = _with_tokenizer(make_tiny_model(seed=0, **TINY_CHAT), smollm2_dir)
    b = _with_tokenizer(make_tiny_model(seed=1, **TINY_CHAT), smollm2_dir)
    return a, b


def app_config(model_a: Path, model_b: Path, port: int, decision_log: Path) -> dict:
    def model(name: str, path: Path, replicas: int, **extra) -> dict:
        return {
            "name": name,
            "engine": {"model": str(path), **ENGINE},
            "replicas": replicas,
            "num_cpus": 0,
            "torch_threads": 1,
            "health_check_period_s": 0.5,
            "graceful_shutdown_timeout_s": 5.0,
            **extra,
        }

    return {
        "name": "kvmesh-test",
        "host": "127.0.0.1",
        "port": port,
        "models": [
            model(
                "tiny",
                model_a,
                2,
                request_router="prefix_aware",
                router_options={"decision_log": True, "decision_log_path": str(decision_log)},
            ),
            # Autoscaled by kvmesh's policy between 1 and 1: the policy runs and reports
            # (autoscaler metrics, /debug/autoscaler) without the replica count moving.
            model(
                "tiny-b",
                model_b,
                1,
                max_pending_requests=2,
                autoscaling={"min_replicas": 1, "max_replicas": 1},
            ),
            # One request at a time, one more may wait for it: the third is refused (503).
            model("tiny-q", model_b, 1, max_ongoing_requests=1, max_queued_requests=1),
        ],
        "aliases": [{"name": "tiny-canary", "weights": {"tiny": 90, "tiny-b": 10}}],
        "api_keys": [API_KEY],
        "response_cache": {"enabled": True, "max_entries": 64},
        "stats_push_period_s": 0.2,
        "debug_hooks": True,
    }


@dataclass
class ServeApp:
    url: str
    config: dict
    model_dirs: tuple[Path, Path]
    decision_log: Path
    api_key: str = API_KEY
    engine_args: dict = field(default_factory=lambda: dict(ENGINE))

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def replicas(self, model: str) -> list[dict]:
        with self.client() as c:
            r = c.get("/debug/replicas")
            r.raise_for_status()
            return [s for s in r.json() if s["model"] == model]


@pytest.fixture(scope="session")
def serve_app(tiny_chat_models, tmp_path_factory) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    from kvmesh.cluster.app import build_app
    from kvmesh.cluster.app_config import AppConfig
    from kvmesh.cluster.serve_env import apply_serve_process_env

    port = free_port()
    decision_log = tmp_path_factory.mktemp("decisions") / "tiny.jsonl"
    config = app_config(*tiny_chat_models, port, decision_log)
    app_cfg = AppConfig.model_validate(config)
    apply_serve_process_env()  # as `kvmesh serve` starts its cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_cfg), name=app_cfg.name, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(f"{url}/ready", timeout_s=180)
        yield ServeApp(url, config, tiny_chat_models, decision_log)
    finally:
        serve.shutdown()
        ray.shutdown()
