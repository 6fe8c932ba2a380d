"""Prefix caching, chunked prefill, preemption, KV events, quantised KV, sliding window."""

from __future__ import annotations

import pytest
from kvmesh_testing import hf_greedy, random_prompts

from kvmesh import LLM, SamplingParams
from kvmesh.replicas.kv.events import replay
from kvmesh.replicas.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def shared_prefix_prompts(seed: int = 1) -> list[list[int]]:
    """Three groups sharing 40-token prefixes, plus two unrelated prompts."""
    prefixes = random_prompts(seed, [40, 40, 40])
    suffixes = random_prompts(seed + 1, [5, 9, 13, 3, 7, 11])
    prompts = [prefixes[i % 3] + s for i, s in enumerate(suffixes)]
    return prompts + random_prompts(seed + 2, [21, 50])


@pytest.fixture(scope="module")
def model_and_reference(make_tiny_model):
    path = make_tiny_model("llama", num_key_value_heads=2)
    prompts = shared_prefix_prompts()
    return path, prompts, hf_greedy(path, prompts, 16)


def run(path, prompts, **engine_args):
    llm = LLM(str(path), block_size=4, **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("budget", [1, 7, 64, None])
def test_identical_across_caching_and_chunk_budgets(
    model_and_reference, prefix_caching, budget, assert_all_blocks_free
):
    path, prompts, expected = model_and_reference
    llm, got = run(
        path, prompts, enable_prefix_caching=prefix_caching, max_num_batched_tokens=budget
    )
    assert got == expected
    assert_all_blocks_free(llm)


def test_identical_with_a_per_request_prefill_cap(model_and_reference, assert_all_blocks_free):
    """``long_prefill_token_threshold``: every prompt computed in chunks of at most 5 tokens
    while others share the step; greedy tokens unchanged."""
    path, prompts, expected = model_and_reference
    llm, got = run(path, prompts, max_num_batched_tokens=16, long_prefill_token_threshold=5)
    assert got == expected
    assert llm.engine.scheduler.prefill_cap == 5
    assert_all_blocks_free(llm)


def test_identical_under_constant_preemption(make_tiny_model, assert_all_blocks_free):
    """A pool where any two requests together overflow it: preemption is constant.

    Our scheduler does not thrash on purpose (a preempted request waits until it fits again),
    so even here preemption happens in about a quarter of steps, not in most.
    """
    path = make_tiny_model("llama", num_key_value_heads=2)
    prompts = random_prompts(3, [3, 4, 5, 6, 3, 4, 5, 6])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = hf_greedy(path, prompts, 8)
    llm = LLM(str(path), block_size=1, num_kv_blocks=16, max_num_batched_tokens=32)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(None, params, request_id=str(i), prompt_token_ids=p)
    done, steps, steps_with_preemption = {}, 0, 0
    while engine.has_unfinished_requests():
        before = engine.scheduler.num_preemptions
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
        steps_with_preemption += engine.scheduler.num_preemptions > before
    assert [done[i] for i in range(len(prompts))] == expected
    assert steps_with_preemption >= steps / 5, (steps_with_preemption, steps)
    assert_all_blocks_free(llm)


def test_shared_prefix_hits_and_stats(model_and_reference, assert_all_blocks_free):
    path, prompts, _ = model_and_reference
    llm = LLM(str(path), block_size=4)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY)
    assert all(o.num_cached_tokens == 0 for o in first)
    second = llm.generate([{"prompt_token_ids": p} for p in prompts[3:6]], GREEDY)
    # Each shares its group's 40-token prefix = 10 full blocks.
    assert [o.num_cached_tokens for o in second] == [40, 40, 40]
    stats = llm.stats()
    assert stats["prefix_cache_hits"] == 120
    assert stats["prefix_cache_queries"] == sum(len(p) for p in prompts[:6])
    assert 0.0 <= stats["kv_cache_usage"] <= 1.0
    assert_all_blocks_free(llm)


def test_events_replay_to_snapshot(model_and_reference):
    path, prompts, _ = model_and_reference
    engine = LLMEngine(model=str(path), block_size=4, num_kv_blocks=30)
    assert engine.drain_kv_events() == []  # none recorded until a consumer asks
    engine.enable_kv_events()
    events = []
    for i, p in enumerate(prompts):
        engine.add_request(None, GREEDY, request_id=str(i), prompt_token_ids=p)
        engine.step()
        events += engine.drain_kv_events()
    while engine.has_unfinished_requests():
        engine.step()
        events += engine.drain_kv_events()
    assert any(type(e).__name__ == "BlockRemoved" for e in events)  # pool small: evictions
    assert replay(events) == engine.kv.cached_block_hashes()


@pytest.mark.parametrize(("kv_dtype", "max_rel_err"), [("int8", 0.02), ("fp8", 0.08)])
def test_quantised_attention_error_is_small(kv_dtype, max_rel_err):
    """Attention over a quantised cache stays close to the float32 one."""
    import torch

    from kvmesh.kernels import torch_ops
    from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer
    from kvmesh.replicas.model_runner import KV_DTYPES

    torch.manual_seed(0)
    nb, bs, kvh, d, seq = 8, 4, 2, 16, 27
    k, v = torch.randn(seq, kvh, d), torch.randn(seq, kvh, d)
    q = torch.randn(seq, 4, d)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, seq], dtype=torch.int32),
        seq_lens=torch.tensor([seq], dtype=torch.int32),
        block_tables=torch.arange(1, nb, dtype=torch.int32)[None],
        slot_mapping=torch.arange(bs, bs + seq),
        max_query_len=seq,
        max_seq_len=seq,
        query_lens_cpu=[seq],
        seq_lens_cpu=[seq],
    )
    full = KVCacheLayer(torch.zeros(nb, bs, kvh, d), torch.zeros(nb, bs, kvh, d))
    qd = KV_DTYPES[kv_dtype]
    quant = KVCacheLayer(
        torch.zeros(nb, bs, kvh, d, dtype=qd),
        torch.zeros(nb, bs, kvh, d, dtype=qd),
        torch.zeros(nb, bs, kvh),
        torch.zeros(nb, bs, kvh),
    )
    outs = []
    for cache in (full, quant):
        torch_ops.reshape_and_cache(k, v, cache, meta.slot_mapping)
        outs.append(torch_ops.paged_attention(q, cache, meta, d**-0.5))
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < max_rel_err, rel


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantised_kv_cache(model_and_reference, kv_dtype, assert_all_blocks_free):
    path, prompts, expected = model_and_reference
    budget = 1 << 20
    full = LLM(str(path), block_size=4, kv_cache_memory_bytes=budget)
    quant = LLM(str(path), block_size=4, kv_cache_memory_bytes=budget, kv_cache_dtype=kv_dtype)
    # head_dim 16: 16 x 4 bytes = 64 vs 16 x 1 + 4 (scale) = 20 bytes per head per token.
    ratio = quant.stats()["kv_blocks_total"] / full.stats()["kv_blocks_total"]
    assert ratio > 3.0
    outs = quant.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    got = [o.outputs[0].token_ids for o in outs]
    # Random tiny models have small logit margins, so long greedy runs drift apart; the
    # first tokens must still mostly agree. (Quality on SmolLM2: bench/kv_quant_quality.py.)
    first_agree = sum(g[0] == e[0] for g, e in zip(got, expected, strict=True))
    assert first_agree >= len(expected) * 3 // 4
    assert_all_blocks_free(quant)


def test_sliding_window_matches_transformers_and_frees_blocks(make_tiny_model):
    path = make_tiny_model("mistral", sliding_window=12, num_key_value_heads=2)
    prompts = random_prompts(5, [30, 7])
    expected = hf_greedy(path, prompts, 24)
    engine = LLMEngine(model=str(path), block_size=4, max_num_batched_tokens=8)
    for i, p in enumerate(prompts):
        engine.add_request(
            None,
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            request_id=str(i),
            prompt_token_ids=p,
        )
    done, peak_blocks = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        peak_blocks = max(
            peak_blocks,
            len(engine.kv.req_blocks.get("0", []))
            and sum(b.block_id != 0 for b in engine.kv.req_blocks.get("0", [])),
        )
    assert [done[0], done[1]] == expected
    # Request 0 reaches 54 tokens = 14 blocks, but a 12-token window needs at most 5 live.
    assert 0 < peak_blocks <= 5
    assert engine.kv.num_blocks_free == engine.kv.num_blocks_total


@pytest.mark.slow
def test_smollm2_identical_with_caching_chunking_and_preemption(smollm2_dir, smol_llm):
    system = "You are a careful assistant. Answer in one short sentence. " * 3
    prompts = [system + q for q in ("Why is the sky blue?", "What is rain?", "Name a fruit.")]
    prompts.append("Count: one, two, three,")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in smol_llm.generate(prompts, params)]
    tight = LLM(str(smollm2_dir), block_size=8, num_kv_blocks=16, max_num_batched_tokens=7)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert got == expected
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_same_prefix_submitted_together_is_computed_once(make_tiny_model):
    """Requests whose prefix another request is computing right now wait a step and hit it."""
    path = make_tiny_model("llama", num_key_value_heads=2)
    prefix = random_prompts(11, [64])[0]
    prompts = [prefix + s for s in random_prompts(12, [8] * 6)]
    llm = LLM(str(path), block_size=8, max_num_batched_tokens=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    # Ideal: every request after the first hits all 8 prefix blocks.
    assert [o.num_cached_tokens for o in outs] == [0] + [64] * 5
    alone = LLM(str(path), block_size=8, enable_prefix_caching=False)
    expected = alone.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


def test_pending_prefill_tokens_counts_uncached_prompt_work(
    make_tiny_model, assert_all_blocks_free
):
    """What a load-aware router reads: prompt tokens still to compute, cache hits excluded."""
    path = make_tiny_model("llama", num_key_value_heads=2)
    prefix, tail_a, tail_b = random_prompts(7, [40, 6, 9])
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=16)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    assert engine.stats()["pending_prefill_tokens"] == 0

    engine.add_request(None, params, "a", prompt_token_ids=prefix + tail_a)
    assert engine.stats()["pending_prefill_tokens"] == 46
    engine.step()  # one 16-token chunk computed, 30 to go
    assert engine.stats()["pending_prefill_tokens"] == 30
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["pending_prefill_tokens"] == 0

    # The 40-token prefix (10 blocks of 4) is cached now: only the tail is left to compute.
    engine.add_request(None, params, "b", prompt_token_ids=prefix + tail_b)
    assert engine.stats()["pending_prefill_tokens"] == 9
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["pending_prefill_tokens"] == 0
    assert_all_blocks_free(llm)
