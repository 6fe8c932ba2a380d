"""bfloat16 on a CPU: when ``dtype="auto"`` picks it, and what a bfloat16 engine keeps."""

from __future__ import annotations

import pytest
import torch

from kvmesh.kernels import cpu_native
from kvmesh.replicas import llm_engine


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx2 fma sse4_2", torch.float32),  # AMD/Intel without native bf16: float32
        ("avx2 avx512f avx512bw", torch.float32),  # AVX-512 alone does not multiply bf16
        ("avx2 avx512f avx512_bf16", torch.bfloat16),
        ("avx2 avx512f amx_bf16 amx_tile", torch.bfloat16),
    ],
)
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.delenv(llm_engine.CPU_AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(cpu_native, "cpu_flags", lambda: flags)
    assert llm_engine.cpu_auto_dtype() == expected


def test_auto_dtype_override(monkeypatch):
    monkeypatch.setattr(cpu_native, "cpu_flags", lambda: "avx2 avx512_bf16")
    monkeypatch.setenv(llm_engine.CPU_AUTO_DTYPE_ENV, "float32")
    assert llm_engine.cpu_auto_dtype() == torch.float32
    monkeypatch.setenv(llm_engine.CPU_AUTO_DTYPE_ENV, "half")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        llm_engine.cpu_auto_dtype()


@pytest.mark.slow
def test_bf16_engine_keeps_a_bf16_cache_and_follows_float32(smollm2_dir, assert_all_blocks_free):
    """Weights, linear layers and the KV cache in bfloat16, RoPE and attention arithmetic in
    float32 (the CPU kernels widen the cache as they read it). Not token-exact with float32
    (that is float32's job), but close: the first token of each prompt agrees and most of the
    continuation does."""
    from kvmesh import LLM, SamplingParams

    prompts = ["The capital of France is", "Water boils at a temperature of"]
    params = SamplingParams(temperature=0, max_tokens=16)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(smollm2_dir), dtype=dtype, num_kv_blocks=64)
        engine = llm.engine
        assert engine.dtype == getattr(torch, dtype)
        assert all(c.k.dtype == c.v.dtype == engine.dtype for c in engine.runner.kv_caches)
        runs[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert_all_blocks_free(llm)
    for exact, fast in zip(runs["float32"], runs["bfloat16"], strict=True):
        assert fast[0] == exact[0]
        assert sum(a == b for a, b in zip(exact, fast, strict=True)) >= len(exact) // 2
