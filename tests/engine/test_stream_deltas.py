"""Streams carry deltas: each step's output holds only what is new, the deltas add up to the
finished output, and the pending-prefill figure is kept incrementally (equal to a full walk)."""

from __future__ import annotations

import random

from kvmesh import SamplingParams
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.serve_messages import ReplicaChunk
from kvmesh.router.streams import GenerationBuilder


def _stream(engine: LLMEngine, prompt: str, params: SamplingParams):
    rid = engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_step_outputs_are_deltas_that_add_up_to_the_final_output(smol_llm):
    engine = smol_llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, logprobs=2, stop=["\n\n\n"])
    outs = _stream(engine, "Write a short list of fruits:", params)
    final = outs[-1]
    assert final.finished and all(not o.finished for o in outs[:-1])
    for o in outs[:-1]:  # while running: one new token, nothing cumulative
        assert len(o.delta_token_ids) == 1 and o.outputs[0].token_ids is o.delta_token_ids
        assert o.outputs[0].text == o.delta_text and len(o.delta_logprobs) == 1
    assert [o.num_output_tokens for o in outs] == list(range(1, len(outs) + 1))
    whole = final.outputs[0]
    assert "".join(o.delta_text for o in outs) == whole.text
    assert [t for o in outs for t in o.delta_token_ids] == whole.token_ids
    assert [e for o in outs for e in o.delta_logprobs] == whole.logprobs
    assert whole.text == smol_llm.tokenizer.decode(whole.token_ids, skip_special_tokens=True)


def test_stop_string_deltas_hold_back_and_cut_exactly(smol_llm):
    engine = smol_llm.engine
    full = _stream(engine, "Count: 1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=16))[
        -1
    ].outputs[0]
    stop = full.text[6:9]  # spans tokens, somewhere inside the text
    outs = _stream(
        engine, "Count: 1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=16, stop=[stop])
    )
    text = "".join(o.delta_text for o in outs)
    assert text == outs[-1].outputs[0].text == full.text[: full.text.index(stop)]
    assert outs[-1].outputs[0].stop_reason == stop


def test_generation_builder_equals_the_concatenation():
    pieces = ["Hel", "", "lo", " wor", "ld", "!"]
    builder = GenerationBuilder("r")
    for i, piece in enumerate(pieces):
        builder.add(
            ReplicaChunk(
                replica="r",
                delta_text=piece,
                delta_token_ids=[i],
                delta_logprobs=[{i: -0.5}],
                finish_reason="stop" if i == len(pieces) - 1 else None,
                num_prompt_tokens=7,
                num_cached_tokens=4,
            )
        )
        assert builder.text_length == len("".join(pieces[: i + 1]))
    gen = builder.build()
    assert gen.text == "Hello world!" and gen.token_ids == list(range(len(pieces)))
    assert gen.logprobs == [{i: -0.5} for i in range(len(pieces))]
    assert (gen.finish_reason, gen.num_prompt_tokens, gen.num_cached_tokens) == ("stop", 7, 4)
    assert builder.build() is gen


def _walked_pending(engine: LLMEngine) -> int:
    """The figure as a walk over every request computes it (estimates as the engine took)."""
    total = sum(
        max(r.num_prompt_tokens - r.num_computed_tokens, 0) for r in engine.scheduler.running
    )
    return total + sum(
        max(r.num_prompt_tokens - r.cached_estimate, 0) for r in engine.scheduler.waiting
    )


def test_pending_prefill_tokens_kept_incrementally_matches_a_walk(make_tiny_model):
    path = make_tiny_model("llama", num_hidden_layers=1, hidden_size=32, head_dim=8)
    # A small pool and budget: chunked prefill, prefix hits, preemption and aborts all happen.
    engine = LLMEngine(model=str(path), block_size=4, num_kv_blocks=12, max_num_batched_tokens=16)
    rnd = random.Random(0)
    shared = [rnd.randrange(3, 320) for _ in range(12)]
    n, steps = 0, 0
    while steps < 400 and (n < 30 or engine.has_unfinished_requests()):
        if n < 30 and rnd.random() < 0.7:
            prompt = (shared if rnd.random() < 0.5 else []) + [
                rnd.randrange(3, 320) for _ in range(rnd.randrange(1, 16))
            ]
            params = SamplingParams(temperature=0, max_tokens=rnd.randrange(4, 16), ignore_eos=True)
            engine.add_request(None, params, request_id=f"q{n}", prompt_token_ids=prompt)
            n += 1
        if engine.requests and rnd.random() < 0.05:
            engine.abort_request(rnd.choice(list(engine.requests)))
        assert engine.stats()["pending_prefill_tokens"] == _walked_pending(engine)
        engine.step()
        steps += 1
        assert engine.stats()["pending_prefill_tokens"] == _walked_pending(engine)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats()["pending_prefill_tokens"] == 0 and not engine.requests
