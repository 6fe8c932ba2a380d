"""Shared fixtures: tiny random-initialised models built here, and the embedded SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from kvmesh_testing import build_tiny_model

# The suite's default engine dtype on a CPU is float32, the exact mode, whatever this CPU is:
# its tests compare greedy tokens with transformers in float32. (On CPUs with AMX-BF16 or
# AVX-512-BF16, dtype="auto" means bfloat16 for users; tests/engine/test_cpu_bf16.py covers
# that path.) Set before anything starts Ray, so replicas inherit it.
os.environ.setdefault("KVMESH_CPU_AUTO_DTYPE", "float32")


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


@pytest.fixture
def assert_all_blocks_free():
    """Call with an LLM/engine at the end of a test: every KV block is back in the pool."""

    def check(llm) -> None:
        stats = llm.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
        assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0

    return check


@pytest.fixture(scope="session")
def smol_llm(smollm2_dir):
    """One SmolLM2 engine shared by the tests that need a real tokenizer and model."""
    from kvmesh import LLM

    return LLM(str(smollm2_dir))
