"""Shared fixtures: tiny random-initialised models built here, and the embedded SmolLM2."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TINY_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    # Larger than transformers' 0.02 so logits are peaked: greedy comparisons then test our
    # arithmetic, not which of two near-equal logits float rounding happens to favour.
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random-initialised HF model (safetensors + config, no tokenizer) to ``path``."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    kwargs = {**TINY_BASE, **overrides}
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
    cfg = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """``make_tiny_model(arch="llama", seed=0, **config_overrides) -> model directory``."""
    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = build_tiny_model(path, arch, seed, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2, converted once into the kvmesh cache."""
    from kvmesh.replicas.model_files import resolve_model_dir

    return resolve_model_dir(None)


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers' generate, one prompt at a time, greedy, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(y[0, len(ids) :].tolist())
    del model
    gc.collect()
    return outs


@pytest.fixture
def assert_all_blocks_free():
    """Call with an LLM/engine at the end of a test: every KV block is back in the pool."""

    def check(llm) -> None:
        stats = llm.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
        assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0

    return check
