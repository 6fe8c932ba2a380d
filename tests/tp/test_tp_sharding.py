"""Sharding arithmetic, per-rank weights and memory, step messages, and a two-rank forward pass
in one process (two threads, real gloo groups): everything about TP that needs no Ray."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from kvmesh_testing import random_prompts

from kvmesh import LLM
from kvmesh.replicas.loader import load_model
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.model_runner import ModelRunner, allocate_kv_cache, prepare_inputs
from kvmesh.replicas.step_types import ScheduledChunk
from kvmesh.replicas.tp.comm import TPGroup, open_store
from kvmesh.replicas.tp.layers import TPShard, check_tp_size
from kvmesh.replicas.tp.messages import BUFFER_LEN, HEADER_LEN, pack_step, unpack_step


def _load(path: Path, cfg: ModelArchConfig, tp: TPShard | None = None):
    return load_model(path, cfg, torch.float32, torch.device("cpu"), 64, tp=tp)


# ---- sizes that do not fit ------------------------------------------------------------------
def test_sizes_that_do_not_divide_are_clear_errors(make_tiny_model):
    cfg = ModelArchConfig.from_dir(make_tiny_model("llama", num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible"):
        check_tp_size(cfg, 3)
    kv3 = cfg.model_copy(update={"num_attention_heads": 6, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 neither divides"):
        check_tp_size(kv3, 2)
    check_tp_size(cfg, 4)  # 4 heads, 4 KV heads, 128 MLP units: fine


def test_llm_rejects_a_bad_size_before_starting_anything(make_tiny_model):
    import ray

    path = make_tiny_model("llama", num_key_value_heads=4)
    was_running = ray.is_initialized()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not fit"):
        LLM(str(path), tensor_parallel_size=3)
    assert ray.is_initialized() == was_running  # failed before Ray was touched


# ---- each rank's slices -----------------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 4])
def test_rank_slices_reassemble_the_checkpoint(tp_model, size):
    """Concatenating the ranks' shards gives back every full weight; replicated KV heads are
    exact copies of the head their ranks' queries use."""
    path, cfg = tp_model
    full = dict(_load(path, cfg).named_parameters())
    shards = [
        dict(_load(path, cfg, TPShard.plan(cfg, r, size)).named_parameters()) for r in range(size)
    ]
    q, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = q // kv  # query heads per KV head
    for name, weight in full.items():
        parts = [s[name] for s in shards]
        if "qkv_proj" in name:
            q_full, k_full, v_full = weight.split([q * d, kv * d, kv * d])
            per_q = q // size * d
            torch.testing.assert_close(
                torch.cat([p[:per_q] for p in parts]), q_full, rtol=0, atol=0
            )
            for r, p in enumerate(parts):
                k, v = p[per_q:].chunk(2)
                first_q_head = r * (q // size)
                heads = sorted({h // group for h in range(first_q_head, first_q_head + q // size)})
                want_k = torch.cat([k_full[h * d : (h + 1) * d] for h in heads])
                want_v = torch.cat([v_full[h * d : (h + 1) * d] for h in heads])
                assert torch.equal(k, want_k) and torch.equal(v, want_v), (name, r)
        elif "gate_up_proj" in name:
            gates, ups = zip(*(p.chunk(2) for p in parts), strict=True)
            assert torch.equal(torch.cat([*gates, *ups]), weight)
        elif "o_proj" in name or "down_proj" in name:
            assert torch.equal(torch.cat(parts, dim=1), weight)
        elif "embed_tokens" in name or "lm_head" in name:
            joined = torch.cat(parts)
            assert torch.equal(joined[: cfg.vocab_size], weight)
            assert not joined[cfg.vocab_size :].any()  # padding rows are zeros
        else:  # norms: replicated
            assert all(torch.equal(p, weight) for p in parts), name


def _bytes(params: dict[str, torch.Tensor], match: str = "") -> int:
    return sum(p.numel() * p.element_size() for n, p in params.items() if match in n)


def test_each_rank_holds_about_one_nth_of_the_parameters(tp_model):
    """Per rank: total / N, plus what is replicated by design: the norms, the extra copies of
    replicated KV heads, and the zero padding of the last vocabulary slice."""
    path, cfg = tp_model
    size = 2
    full = dict(_load(path, cfg).named_parameters())
    total, norms = _bytes(full), _bytes(full, "norm")
    kv_copy = 0
    if cfg.num_key_value_heads < size:  # each rank holds a whole KV head instead of a share
        per_layer = 2 * cfg.head_dim * cfg.hidden_size * 4 * (1 - cfg.num_key_value_heads / size)
        kv_copy = int(per_layer * cfg.num_hidden_layers)
    if cfg.attention_bias and cfg.num_key_value_heads < size:
        kv_copy += int(2 * cfg.head_dim * 4 * (1 - 1 / size) * cfg.num_hidden_layers)
    vocab_tables = 1 if cfg.tie_word_embeddings else 2
    pad_rows = -(-cfg.vocab_size // size) * size - cfg.vocab_size
    padding = pad_rows * cfg.hidden_size * 4 * vocab_tables
    for rank in range(size):
        shard = dict(_load(path, cfg, TPShard.plan(cfg, rank, size)).named_parameters())
        expected = (total - norms) / size + norms + kv_copy + padding / size
        assert _bytes(shard) == pytest.approx(expected, abs=padding / size + 1)
        assert _bytes(shard) < 0.6 * total


# ---- step messages ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_decodes", [3, 600])  # one broadcast / two broadcasts
def test_step_inputs_survive_packing(num_decodes):
    chunks = [
        ScheduledChunk(str(i), [11 + i % 7], 6 + i % 7, list(range(i + 1, i + 6)), True)
        for i in range(num_decodes)
    ]
    chunks.append(ScheduledChunk("p", list(range(11, 31)), 8, list(range(40, 50)), False))
    inputs = prepare_inputs(chunks, 4, torch.device("cpu"))
    header, payload = pack_step(inputs)
    assert (HEADER_LEN + payload.numel() <= BUFFER_LEN) == (num_decodes < 100)
    got = unpack_step(header, payload, torch.device("cpu"))
    for field in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(got, field), getattr(inputs, field)), field
    for field in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        a, b = getattr(got.meta, field), getattr(inputs.meta, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    for field in ("max_query_len", "max_seq_len", "query_lens_cpu", "seq_lens_cpu"):
        assert getattr(got.meta, field) == getattr(inputs.meta, field), field


# ---- a real two-rank forward pass, in one process ---------------------------------------------
def _prefill_inputs(prompt: list[int], block_size: int = 4):
    blocks = list(range(1, 2 + len(prompt) // block_size))
    chunk = ScheduledChunk("r", list(prompt), 0, blocks, sample=True)
    return prepare_inputs([chunk], block_size, torch.device("cpu"))


def test_two_ranks_in_threads_match_one(tp_model):
    """Rank 0's gathered logits equal the unsharded model's (to float rounding: the all-reduce
    adds partial sums in another order), and the ranks agree on the greedy token."""
    path, cfg = tp_model
    prompt = random_prompts(7, [37], vocab=cfg.vocab_size)[0]
    kv = allocate_kv_cache(cfg, 16, 4, torch.float32, "auto", torch.device("cpu"))
    want = ModelRunner(_load(path, cfg), kv, "cpu").forward(_prefill_inputs(prompt))

    store = open_store("127.0.0.1", 0, 2, 0, timeout_s=30)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            s = store if rank == 0 else open_store("127.0.0.1", store.port, 2, 1, timeout_s=30)
            group = TPGroup(s, rank, 2, torch.device("cpu"), timeout_s=30)
            shard = TPShard.plan(cfg, rank, 2, group)
            model = _load(path, cfg, shard)
            caches = allocate_kv_cache(
                cfg, 16, 4, torch.float32, "auto", "cpu", num_kv_heads=shard.num_kv_heads
            )
            results[rank] = ModelRunner(model, caches, "cpu").forward(_prefill_inputs(prompt))
            group.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results[0].shape == (1, cfg.vocab_size)
    assert results[1].shape == (0, cfg.vocab_size)  # only rank 0 gets logits
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=1e-5)
    assert results[0].argmax(-1).tolist() == want.argmax(-1).tolist()
