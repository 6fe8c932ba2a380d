"""Greedy output is token-identical to transformers' generate (float32)."""

from __future__ import annotations

import pytest
from kvmesh_testing import hf_greedy, random_prompts

from kvmesh import LLM, SamplingParams
from kvmesh.replicas.llm_engine import LLMEngine

MAX_NEW = 20
LENGTHS = [3, 16, 37, 90]

MODELS = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2-gqa-bias": ("qwen2", dict(num_key_value_heads=2)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2)),
    "llama-rope-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-rope-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "llama-headdim32": (
        "llama",
        dict(head_dim=32, num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
    ),
}


@pytest.fixture(scope="module")
def references(make_tiny_model):
    cache = {}

    def get(name):
        if name not in cache:
            arch, overrides = MODELS[name]
            path = make_tiny_model(arch, **overrides)
            prompts = random_prompts(hash(name) % 1000, LENGTHS)
            cache[name] = (path, prompts, hf_greedy(path, prompts, MAX_NEW))
        return cache[name]

    return get


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_submitted_together(name, references, assert_all_blocks_free):
    path, prompts, expected = references(name)
    llm = LLM(str(path), block_size=8, max_num_batched_tokens=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-bias", "mistral-gqa"])
def test_staggered_arrivals(name, references):
    """Requests join a batch that is already decoding: still token-identical."""
    path, prompts, expected = references(name)
    engine = LLMEngine(model=str(path), block_size=4, max_num_batched_tokens=32)
    done = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(None, GREEDY, request_id=str(i), prompt_token_ids=p)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == expected
    assert engine.kv.num_blocks_free == engine.kv.num_blocks_total


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir, smol_llm):
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away,",
        "List three colours of the rainbow:",
    ]
    ids = [smol_llm.tokenizer.encode(p) for p in prompts]
    expected = hf_greedy(smollm2_dir, ids, 32)
    outs = smol_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    # Text is the incremental detokenisation of exactly those tokens.
    for o in outs:
        assert o.outputs[0].text == smol_llm.tokenizer.decode(
            o.outputs[0].token_ids, skip_special_tokens=True
        )
