"""``kvmesh plan``: the capacity arithmetic against hand-computed numbers, against the model
kvmesh builds (every rank's parameters), and against what the engine allocates."""

from __future__ import annotations

import json

import pytest
import torch

from kvmesh.cluster.cli import main
from kvmesh.replicas import capacity
from kvmesh.replicas.capacity import NAMED_SHAPES, ModelShape, plan
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.models.llama import LlamaForCausalLM
from kvmesh.replicas.tp.layers import TPShard

GiB = 1 << 30
OVERHEAD = 512 << 20  # capacity.DEFAULT_RUNTIME_OVERHEAD_BYTES


def hf_config(layers, hidden, inter, heads, kv_heads, vocab, tied, **extra):
    """A Hugging Face Llama ``config.json`` as published."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        **extra,
    }


LLAMA_3_8B = hf_config(32, 4096, 14336, 32, 8, 128256, False)
LLAMA_3_70B = hf_config(80, 8192, 28672, 64, 8, 128256, False)


# ---- shapes ----------------------------------------------------------------------------------
def test_named_shapes_are_the_published_configs(smollm2_dir):
    for name, raw in [("llama-3-8b", LLAMA_3_8B), ("llama-3-70b", LLAMA_3_70B)]:
        assert ModelShape.from_config(raw, name) == NAMED_SHAPES[name]
    embedded = ModelShape.from_dir(smollm2_dir)
    named = NAMED_SHAPES["smollm2-135m"]
    for field in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"):
        assert getattr(embedded, field) == getattr(named, field), field
    assert embedded.tied_embeddings and named.tied_embeddings
    assert ModelShape.from_dir(smollm2_dir / "config.json").layers == 30
    with pytest.raises(ValueError, match="unknown shape"):
        ModelShape.named("llama-5")


# ---- hand-computed -------------------------------------------------------------------------
def test_parameter_counts_by_hand():
    # embeddings (+ untied head) + layers × (q + k + v + o + gate/up/down + 2 norms) + final norm
    llama8 = 128256 * 4096 * 2 + 32 * (
        4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    )
    assert llama8 + 4096 == 8_030_261_248 == capacity.param_count(NAMED_SHAPES["llama-3-8b"])
    llama70 = 128256 * 8192 * 2 + 80 * (
        8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    )
    assert llama70 + 8192 == 70_553_706_496 == capacity.param_count(NAMED_SHAPES["llama-3-70b"])
    smol = 49152 * 576 + 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    assert smol + 576 == 134_515_008 == capacity.param_count(NAMED_SHAPES["smollm2-135m"])


def test_parameters_per_rank_by_hand():
    # TP 4: vocab rows 128256/4, q heads 32/4, KV heads 8/4, MLP 14336/4; norms replicated
    tp4 = 32064 * 4096 * 2 + 32 * (
        4096 * 1024 + 2 * 4096 * 256 + 1024 * 4096 + 3 * 4096 * 3584 + 2 * 4096
    )
    assert capacity.param_count(NAMED_SHAPES["llama-3-8b"], 4) == tp4 + 4096
    assert capacity.weight_bytes(NAMED_SHAPES["llama-3-8b"], 2, 4) == (tp4 + 4096) * 2
    # 70B at TP 8: one KV head per rank
    tp8 = 16032 * 8192 * 2 + 80 * (
        8192 * 1024 + 2 * 8192 * 128 + 1024 * 8192 + 3 * 8192 * 3584 + 2 * 8192
    )
    assert capacity.param_count(NAMED_SHAPES["llama-3-70b"], 8) == tp8 + 8192
    assert capacity.weight_bytes(NAMED_SHAPES["llama-3-70b"], 2, 8) == (tp8 + 8192) * 2


@pytest.mark.parametrize(
    "name, tp, expected",
    [
        ("llama-3-8b", 1, 32 * 8 * 128 * 2 * 2),  # 131072
        ("llama-3-8b", 4, 32 * 2 * 128 * 2 * 2),
        ("llama-3-8b", 8, 32 * 1 * 128 * 2 * 2),
        ("llama-3-70b", 1, 80 * 8 * 128 * 2 * 2),  # 327680
        ("llama-3-70b", 4, 80 * 2 * 128 * 2 * 2),
        ("llama-3-70b", 8, 80 * 1 * 128 * 2 * 2),
        ("smollm2-135m", 1, 30 * 3 * 64 * 2 * 2),  # 23040
        ("smollm2-135m", 3, 30 * 1 * 64 * 2 * 2),
    ],
)
def test_kv_bytes_per_token_by_hand(name, tp, expected):
    shape = NAMED_SHAPES[name]
    assert capacity.kv_bytes_per_token(shape, 2, tp) == expected
    assert capacity.kv_bytes_per_block(shape, 16, 2, tp) == 16 * expected
    # int8/fp8: one byte per value and a float32 scale per head and token
    heads = shape.kv_heads // tp
    quant = shape.layers * heads * 2 * (shape.head_dim + 4)
    assert capacity.kv_bytes_per_token(shape, 2, tp, "int8") == quant


def test_more_ranks_than_kv_heads_replicate_one_head():
    shape = ModelShape.from_config(hf_config(2, 512, 1024, 16, 2, 1000, False), "small")
    assert capacity.kv_bytes_per_token(shape, 2, 8) == 2 * 1 * 32 * 2 * 2
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        capacity.param_count(NAMED_SHAPES["llama-3-8b"], 3)


@pytest.mark.parametrize("name, tp", [("llama-3-8b", 4), ("llama-3-70b", 4), ("llama-3-70b", 8)])
def test_plan_by_hand(name, tp):
    shape = NAMED_SHAPES[name]
    p = plan(shape, gpu_memory_bytes=80 * GiB, tp=tp, request_len=4096)
    weights = capacity.param_count(shape, tp) * 2  # bf16
    per_token = shape.layers * (shape.kv_heads // tp) * shape.head_dim * 2 * 2
    free = 80 * GiB - OVERHEAD - weights
    blocks = int(free * 0.85) // (16 * per_token)
    assert p.weight_bytes_per_rank == weights
    assert p.kv_bytes_per_token == per_token
    assert p.free_bytes_after_weights == free
    assert p.num_kv_blocks == blocks
    assert p.kv_cache_bytes == blocks * 16 * per_token
    assert p.tokens_that_fit == (blocks - 1) * 16  # block 0 is the null block
    assert p.concurrent_requests == (blocks - 1) // (4096 // 16)
    assert p.replicas_per_node == 8 // tp
    assert p.fits


def test_plan_numbers_for_llama_3_8b_at_tp4_on_80_gib():
    p = plan(NAMED_SHAPES["llama-3-8b"], gpu_memory_bytes=80 * GiB, tp=4, request_len=4096)
    assert p.params_per_rank == 2_007_764_992
    assert p.weight_bytes_per_rank == 4_015_529_984
    assert p.kv_bytes_per_token == 32_768
    assert p.num_kv_blocks == 131_883
    assert p.tokens_that_fit == 2_110_112
    assert p.concurrent_requests == 515
    assert p.replicas_per_node == 2


def test_70b_on_one_80_gib_gpu_does_not_fit():
    p = plan(NAMED_SHAPES["llama-3-70b"], gpu_memory_bytes=80 * GiB, tp=1)
    assert p.weight_bytes_per_rank == 70_553_706_496 * 2
    assert p.num_kv_blocks == 0 and p.tokens_that_fit == 0 and not p.fits


# ---- the model kvmesh builds ---------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, sizes",
    [(LLAMA_3_8B, [1, 4, 8]), (LLAMA_3_70B, [4, 8])],
    ids=["llama-3-8b", "llama-3-70b"],
)
def test_param_count_matches_every_ranks_module(raw, sizes):
    """Build each rank's model on the meta device (no memory) and count its parameters."""
    cfg = ModelArchConfig.from_dict(raw)
    shape = ModelShape.from_arch(cfg)
    for n in sizes:
        for rank in sorted({0, n - 1}):
            shard = TPShard.plan(cfg, rank, n) if n > 1 else None
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg, 8192, shard)
            assert sum(p.numel() for p in model.parameters()) == capacity.param_count(shape, n)
            if shard is not None:
                assert shard.num_kv_heads == capacity.kv_heads_per_rank(cfg.num_key_value_heads, n)


# ---- the engine ------------------------------------------------------------------------------
def allocated_bytes(engine) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in engine.runner.kv_caches
        for t in (layer.k, layer.v, layer.k_scale, layer.v_scale)
        if t is not None
    )


def check_engine_matches(engine, p) -> None:
    assert engine.kv.num_blocks_total + 1 == p.num_kv_blocks
    assert engine.kv.capacity_tokens == p.tokens_that_fit
    assert allocated_bytes(engine) == p.kv_cache_bytes


def test_engine_default_cpu_cache_equals_the_plan(smol_llm, smollm2_dir):
    engine = smol_llm.engine
    shape = ModelShape.from_dir(smollm2_dir)
    dtype = str(engine.dtype).removeprefix("torch.")
    assert sum(p.numel() * p.element_size() for p in engine.model.parameters()) == (
        capacity.weight_bytes(shape, capacity.DTYPE_BYTES[dtype])
    )
    args = engine.args
    per_block = capacity.kv_bytes_per_block(shape, args.block_size, capacity.DTYPE_BYTES[dtype])
    budget = capacity.default_cpu_kv_budget(
        per_block, args.max_num_seqs, engine.max_model_len, args.block_size
    )
    p = plan(shape, kv_cache_memory_bytes=budget, dtype=dtype, block_size=args.block_size)
    check_engine_matches(engine, p)


def test_engine_gpu_rule_equals_the_plan(smol_llm, smollm2_dir, monkeypatch):
    """The engine's GPU branch, with the free memory a GPU of ``memory`` bytes would report
    once the weights and the runtime overhead are in: the plan's block count."""
    engine = smol_llm.engine
    shape = ModelShape.from_dir(smollm2_dir)
    dtype = str(engine.dtype).removeprefix("torch.")
    memory = 24 * GiB
    p = plan(shape, gpu_memory_bytes=memory, dtype=dtype, block_size=engine.args.block_size)
    free = memory - OVERHEAD - p.weight_bytes_per_rank
    assert p.free_bytes_after_weights == free
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, memory))
    assert engine._num_kv_blocks() == p.num_kv_blocks == int(free * 0.85) // p.kv_bytes_per_block


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_engine_sized_by_memory_equals_the_plan(smollm2_dir, kv_cache_dtype):
    budget = 40_000_000
    engine = LLMEngine(
        model=str(smollm2_dir),
        block_size=16,
        kv_cache_memory_bytes=budget,
        kv_cache_dtype=kv_cache_dtype,
        warmup=False,
    )
    try:
        dtype = str(engine.dtype).removeprefix("torch.")
        p = plan(
            ModelShape.from_dir(smollm2_dir),
            kv_cache_memory_bytes=budget,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            block_size=16,
        )
        per_token = 30 * 3 * 2 * (64 * 4 if kv_cache_dtype == "auto" else 64 + 4)  # fp32 on CPU
        assert dtype == "float32" and p.kv_bytes_per_token == per_token
        assert p.num_kv_blocks == budget // (16 * per_token)
        check_engine_matches(engine, p)
    finally:
        engine.shutdown()


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_json(capsys):
    argv = ["plan", "--shape", "llama-3-8b", "--gpu-memory-gib", "80"]
    assert main([*argv, "--tensor-parallel-size", "4", "--request-len", "4096", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = plan(NAMED_SHAPES["llama-3-8b"], gpu_memory_bytes=80 * GiB, tp=4, request_len=4096)
    assert got == expected.as_json()
    assert got["kv_bytes_per_token"] == 32 * 2 * 128 * 2 * 2
    assert got["params_total"] == 8_030_261_248
    assert got["replicas_per_node"] == 2 and got["dtype"] == "bfloat16" and got["fits"]


def test_cli_table_and_errors(capsys, smollm2_dir):
    assert main(["plan", "--model", str(smollm2_dir), "--gpu-memory-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "tokens that fit" in out and "134,515,008" in out
    assert main(["plan", "--shape", "llama-3-70b", "--gpu-memory-gib", "80"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "--shape", "llama-3-8b", "--tensor-parallel-size", "3"]) == 2
    assert "tensor_parallel_size=3" in capsys.readouterr().err
