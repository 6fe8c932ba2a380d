"""Property-based: random add / step / abort sequences never corrupt the KV books."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh import SamplingParams
from kvmesh.replicas.kv.block_pool import NULL_BLOCK_ID
from kvmesh.replicas.kv.events import replay
from kvmesh.replicas.llm_engine import LLMEngine

PREFIXES = [[7] * 9, [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], []]


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    # 20 blocks of 4: small enough that random workloads evict and preempt.
    engine = LLMEngine(model=str(path), block_size=4, num_kv_blocks=20, max_num_batched_tokens=12)
    engine.enable_kv_events()
    return engine


def check_books(engine: LLMEngine, events: list, start: set) -> None:
    kv = engine.kv
    kv.check_invariants()
    used = sum(1 for b in kv.pool.blocks[1:] if b.ref_count > 0)
    assert used + kv.num_blocks_free == kv.num_blocks_total
    assert kv.pool.blocks[NULL_BLOCK_ID].ref_count == 0
    events += engine.drain_kv_events()
    assert replay(events, start) == kv.cached_block_hashes()


op = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, len(PREFIXES) - 1),
        st.integers(1, 20),
        st.integers(1, 12),
    ),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_random_workloads_keep_the_books(engine, ops, seed):
    start = engine.kv.cached_block_hashes()
    engine.drain_kv_events()
    events: list = []
    added: list[str] = []
    for n, item in enumerate(ops):
        if item[0] == "add":
            _, prefix, suffix_len, max_tokens = item
            prompt = PREFIXES[prefix] + [(seed + n + k) % 300 + 3 for k in range(suffix_len)]
            rid = f"{seed}-{n}"
            engine.add_request(
                None,
                SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                request_id=rid,
                prompt_token_ids=prompt,
            )
            added.append(rid)
        elif item[0] == "step":
            engine.step()
        elif added:
            engine.abort_request(added[item[1] % len(added)])
        check_books(engine, events, start)
    while engine.has_unfinished_requests():
        engine.step()
        check_books(engine, events, start)
    assert engine.kv.num_blocks_free == engine.kv.num_blocks_total
    assert not engine.requests
