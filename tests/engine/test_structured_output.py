"""Structured output in the engine: every constrained output follows its schema, regex,
choice or grammar; unconstrained requests in the same batch are untouched (token for token);
grammars survive preemption; bad specs are refused before anything is queued."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.replicas.structured import GrammarError, StructuredOutputsParams

SUITE = Path(__file__).parents[1] / "data" / "structured" / "schemas.json"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": ["string", "null"], "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _suite() -> list[dict]:
    return json.loads(SUITE.read_text())


REFUSED = {"product_catalog_entry", "movie_review", "contact_oneof_required"}
"""Suite schemas the grammar cannot enforce exactly (``uniqueItems``; a ``oneOf`` whose
branches may overlap): refused with a 400, never loosened."""


def _json_params(schema: dict, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 256)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=schema), **kw)


def _chat(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give an example {name.replace('_', ' ')} as JSON."}]


def _check_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_schema_suite_greedy_and_sampled_mixed_with_plain_requests(
    smol_llm, assert_all_blocks_free
):
    """41 real-world schemas, greedy and sampled, in one batch with unconstrained requests:
    every output that ends ("stop") parses and validates, and the unconstrained requests'
    greedy tokens are those of a batch without any constrained request.

    A 135M model sometimes repeats itself inside a string or an array until ``max_tokens``:
    such an output ends with "length" (a valid prefix, said to be cut). The floor on
    completed outputs catches a grammar that stops the model from ever finishing."""
    suite = _suite()
    assert len(suite) >= 30
    refused = set()
    for case in suite:
        try:
            smol_llm.engine.structured.compile(StructuredOutputsParams(json=case["schema"]))
        except GrammarError as exc:
            assert "exactly or not at all" in exc.message
            refused.add(case["name"])
    assert refused == REFUSED
    suite = [case for case in suite if case["name"] not in REFUSED]

    plain_prompts = [
        [{"role": "user", "content": f"Write a haiku about the number {i}."}] for i in range(8)
    ]
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    alone = smol_llm.chat(plain_prompts, [plain] * len(plain_prompts))

    conversations, params = [], []
    for i, case in enumerate(suite):
        conversations += [_chat(case["name"])] * 2
        params += [
            _json_params(case["schema"]),
            _json_params(case["schema"], temperature=0.8, seed=i),
        ]
    outs = smol_llm.chat(plain_prompts + conversations, [plain] * len(plain_prompts) + params)

    for before, after in zip(alone, outs[: len(plain_prompts)], strict=True):
        assert after.outputs[0].token_ids == before.outputs[0].token_ids
    completed = 0
    for i, out in enumerate(outs[len(plain_prompts) :]):
        completion = out.outputs[0]
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "stop":
            _check_valid(completion.text, suite[i // 2]["schema"])
            completed += 1
        else:
            assert len(completion.token_ids) == 256
    assert completed >= len(params) // 2, f"{completed} of {len(params)} completed"
    assert_all_blocks_free(smol_llm)


def test_schema_suite_on_a_random_model(make_tiny_model, smollm2_dir, assert_all_blocks_free):
    """A random model's tokens inside the JSON are whatever the mask leaves, so this checks
    the grammar alone: every output that ends validates. (A random model rarely closes a
    string that has no ``maxLength``: those outputs end at ``max_tokens`` as "length".)"""
    model = make_tiny_model(seed=5, vocab_size=49152, hidden_size=64, intermediate_size=128)
    llm = LLM(str(model), tokenizer=str(smollm2_dir), num_kv_blocks=1024, max_num_seqs=128)
    suite = [case for case in _suite() if case["name"] not in REFUSED]
    params = [
        _json_params(case["schema"], max_tokens=128, temperature=t, seed=i)
        for i, case in enumerate(suite)
        for t in (0.0, 1.0)
    ]
    prompts = [{"prompt_token_ids": [1 + i, 2 + i, 3 + i]} for i in range(len(params))]
    outs = llm.generate(prompts, params)
    completed = 0
    for i, out in enumerate(outs):
        if out.outputs[0].finish_reason == "stop":
            _check_valid(out.outputs[0].text, suite[i // 2]["schema"])
            completed += 1
    assert completed >= 10
    assert_all_blocks_free(llm)


def test_regex_choice_grammar_and_json_object(smol_llm, assert_all_blocks_free):
    S = StructuredOutputsParams
    cases = [
        (S(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (S(choice=["red", "green", 'say "blue"']), lambda t: t in ("red", "green", 'say "blue"')),
        (
            S(grammar='root ::= "yes" | "no" | "maybe " [0-9]'),
            lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t),
        ),
        (S(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    messages = [{"role": "user", "content": "Answer the question: is the sky blue?"}]
    for temperature in (0.0, 1.0):
        params = [
            SamplingParams(structured_outputs=s, max_tokens=200, temperature=temperature, seed=7)
            for s, _ in cases
        ]
        outs = smol_llm.chat([messages] * len(cases), params)
        for (_, ok), out in zip(cases, outs, strict=True):
            assert out.outputs[0].finish_reason == "stop"
            assert ok(out.outputs[0].text), out.outputs[0].text
    assert_all_blocks_free(smol_llm)


def test_random_model_follows_grammar_with_preemption_and_chunking(
    make_tiny_model, smollm2_dir, assert_all_blocks_free
):
    """A random model has no idea what JSON is: every token it emits is the grammar's doing.
    A pool too small for the batch preempts requests mid-structure (the grammar state stays
    with the request) and long prompts are chunked; outputs are still valid, and greedy
    outputs equal those of a roomy engine."""
    model = make_tiny_model(seed=3, vocab_size=49152, hidden_size=64, intermediate_size=128)
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "level": {"enum": ["low", "mid", "high"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["ok", "level", "n"],
        "additionalProperties": False,
    }
    prompts = [
        {"prompt_token_ids": list(range(5 + i, 5 + i + 40 * (1 + i % 3)))} for i in range(24)
    ]
    params = [
        SamplingParams(
            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
            max_tokens=60,
            temperature=0.0 if i % 2 == 0 else 1.0,
            seed=i,
        )
        for i in range(24)
    ]
    tok = str(smollm2_dir)  # SmolLM2's vocabulary: a real token table for the grammar
    roomy = LLM(str(model), tokenizer=tok, num_kv_blocks=256, block_size=4)
    tight = LLM(
        str(model),
        tokenizer=tok,
        num_kv_blocks=60,
        block_size=4,
        max_num_batched_tokens=32,
        max_num_seqs=12,
    )
    a = roomy.generate(prompts, params)
    b = tight.generate(prompts, params)
    assert tight.stats()["num_preemptions"] > 0
    for x, y in zip(a, b, strict=True):
        for out in (x, y):
            assert out.outputs[0].finish_reason == "stop"
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert_all_blocks_free(roomy)
    assert_all_blocks_free(tight)


def test_length_mid_structure_and_grammar_end_beats_ignore_eos(smol_llm, assert_all_blocks_free):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    cut, done = smol_llm.chat(
        [messages, messages],
        [_json_params(PERSON, max_tokens=5), _json_params(PERSON, ignore_eos=True)],
    )
    assert cut.outputs[0].finish_reason == "length"
    assert len(cut.outputs[0].token_ids) == 5
    with pytest.raises(ValueError):
        json.loads(cut.outputs[0].text)
    # ignore_eos cannot run past the end of the grammar: the output ends where it is whole.
    assert done.outputs[0].finish_reason == "stop"
    _check_valid(done.outputs[0].text, PERSON)
    assert_all_blocks_free(smol_llm)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": "objectx"}}, "invalid JSON schema"),
        ({"json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}, "nope"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"regex": "a(b"}, "unclosed group"),
        ({"grammar": "root ::= foo"}, "invalid grammar: Rule 'foo' not found"),
        ({"json": {"type": "array", "uniqueItems": True}}, 'Unimplemented keys: ["uniqueItems"]'),
        ({"json": {"type": "string", "pattern": "a(b"}}, "at pattern: 'a(b' is not a 'regex'"),
        ({"choice": []}, "choice needs 1 to"),
        ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ],
)
def test_bad_specs_are_refused_before_anything_is_queued(smol_llm, spec, message):
    engine = smol_llm.engine
    waiting_before = len(engine.requests)
    good = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        smol_llm.generate(
            ["fine", "bad"], [good, SamplingParams(max_tokens=4, structured_outputs=spec)]
        )
    assert len(engine.requests) == waiting_before == 0


def test_compile_time_limit_refuses_instead_of_stalling(smollm2_dir):
    import asyncio

    from kvmesh.replicas.input_processor import load_tokenizer
    from kvmesh.replicas.structured import StructuredOutputCompiler

    tokenizer = load_tokenizer(smollm2_dir)
    compiler = StructuredOutputCompiler(tokenizer, 49152, [2], compile_timeout_s=0.01)
    heavy = {
        "type": "object",
        "properties": {
            f"f{i}": {
                "type": "object",
                "properties": {
                    f"g{j}": {"type": "string", "pattern": "[a-z]{3,9}@[a-z]+\\.com"}
                    for j in range(24)
                },
                "required": [f"g{j}" for j in range(24)],
            }
            for i in range(24)
        },
        "required": [f"f{i}" for i in range(24)],
    }
    compiler.compile(StructuredOutputsParams(json={"type": "object"}))  # the token table
    with pytest.raises(GrammarError, match=r"could not be compiled within 0\.01 s"):
        asyncio.run(compiler.compile_async(StructuredOutputsParams(json=heavy)))
    compiler.close()


def test_a_fault_in_one_requests_mask_fails_it_alone(smol_llm, assert_all_blocks_free):
    engine = smol_llm.engine
    victim = {}

    def injector(phase: str, request) -> None:
        if phase == "grammar" and request.request_id == victim.get("id"):
            raise RuntimeError("injected mask fault")

    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    ids = [
        engine.add_request(None, _json_params(PERSON), prompt_token_ids=tokens)
        for tokens in [engine.input_processor.encode_chat(messages)[1]] * 3
    ]
    victim["id"] = ids[1]
    engine.fault_injector = injector
    finished = {}
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    finally:
        engine.fault_injector = None
    assert finished[ids[1]].outputs[0].finish_reason == "error"
    for rid in (ids[0], ids[2]):
        assert finished[rid].outputs[0].finish_reason == "stop"
        _check_valid(finished[rid].outputs[0].text, PERSON)
    assert_all_blocks_free(smol_llm)


def test_bitmask_masks_exactly_the_constrained_rows():
    """The additive mask equals a boolean ``masked_fill`` on the constrained rows, leaves
    every other row bit for bit as it was, and disallows logits wider than the mask."""
    import torch

    from kvmesh.replicas.structured.bitmask import apply_bitmask

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=gen)
    logits[1, 5] = float("inf")  # extreme logits stay extreme where allowed
    logits[1, 6] = -1e30
    bitmask = torch.randint(-(2**31), 2**31 - 1, (6, 3), dtype=torch.int32, generator=gen)
    bitmask[1, 0] = -1  # tokens 0..31 of row 1 all allowed
    rows = [1, 4]
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(6, -1)[:, :96].bool()
    want = logits.clone()
    for r in rows:
        want[r, :96].masked_fill_(~allowed[r], float("-inf"))
        want[r, 96:] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, bitmask, rows)
    assert torch.equal(got, want)
    assert got[1, 5] == float("inf") and got[1, 6] == -1e30
