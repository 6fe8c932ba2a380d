"""Fixtures for the tensor-parallel tests: one local Ray per module, the tiny TP models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.replicas.model_arch import ModelArchConfig

# Tiny models to shard over 2 ranks: 4 query heads and 4, 2 or 1 KV heads (1 = replicated).
# Qwen2 adds QKV biases; an odd vocabulary pads the last rank's vocabulary slice; tied
# embeddings make the vocab-parallel embedding the LM head too.
TP_MODELS = {
    "llama-kv4": ("llama", dict(num_key_value_heads=4)),
    "qwen2-kv2-bias-tied-oddvocab": (
        "qwen2",
        dict(num_key_value_heads=2, vocab_size=321, tie_word_embeddings=True),
    ),
    "llama-kv1-replicated": ("llama", dict(num_key_value_heads=1)),
}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole module (starting one takes ~10 s)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(params=list(TP_MODELS))
def tp_model(request, make_tiny_model) -> tuple[Path, ModelArchConfig]:
    """Each TP test model in turn: (directory, its architecture config)."""
    arch, overrides = TP_MODELS[request.param]
    path = make_tiny_model(arch, **overrides)
    return path, ModelArchConfig.from_dir(path)
