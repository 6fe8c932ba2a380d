"""Sampling controls, stop conditions, and clear errors for bad input."""

from __future__ import annotations

import pytest

from kvmesh import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return LLM(str(make_tiny_model("llama")), block_size=4, num_kv_blocks=64)


def ids(*tokens):
    return {"prompt_token_ids": list(tokens)}


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny, assert_all_blocks_free):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12)
    alone = tiny.generate(ids(5, 6, 7), params)[0].outputs[0].token_ids
    others = [ids(9, 10, 11, 12), ids(40, 41), ids(100, 101, 102, 103, 104)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=20)
    batch = tiny.generate([*others, ids(5, 6, 7)], [unseeded] * 3 + [params])
    assert batch[-1].outputs[0].token_ids == alone
    different = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=1.0, seed=99, max_tokens=12))
    assert different[0].outputs[0].token_ids != alone  # 12 tokens from 320: a clash is ~impossible
    assert_all_blocks_free(tiny)


def test_top_k_1_is_greedy(tiny):
    greedy = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=10))
    topk1 = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=0.7, top_k=1, max_tokens=10))
    assert greedy[0].outputs[0].token_ids == topk1[0].outputs[0].token_ids


def test_stop_token_ids_and_max_tokens(tiny):
    free_run = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=10))[0]
    tokens = free_run.outputs[0].token_ids
    assert len(tokens) == 10 and free_run.outputs[0].finish_reason == "length"
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    out = tiny.generate(
        ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at])
    )[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_repetition_penalties_change_output(tiny):
    base = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=16))[0]
    penalised = tiny.generate(
        ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=16, frequency_penalty=2.0)
    )[0]
    counts = lambda t: max(t.count(x) for x in set(t))  # noqa: E731
    assert counts(penalised.outputs[0].token_ids) <= counts(base.outputs[0].token_ids)


def test_logprobs_top_n(tiny):
    out = tiny.generate(ids(5, 6, 7), SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.outputs[0].token_ids, lps, strict=True):
        assert token in entry and len(entry) == 3  # greedy token is also the top one
        assert entry[token] == max(entry.values()) and entry[token] <= 0.0


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(temperature=-1), "temperature"),
        (lambda: SamplingParams(top_p=0), "top_p"),
        (lambda: SamplingParams(top_k=0), "top_k"),
        (lambda: SamplingParams(min_p=1.5), "min_p"),
        (lambda: SamplingParams(presence_penalty=3), "presence_penalty"),
        (lambda: SamplingParams(frequency_penalty=-3), "frequency_penalty"),
        (lambda: SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (lambda: SamplingParams(logprobs=50), "logprobs"),
    ],
)
def test_bad_sampling_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_prompts_are_clear_errors_and_the_engine_goes_on(tiny, assert_all_blocks_free):
    with pytest.raises(ValueError, match="empty"):
        tiny.generate(ids(), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"outside \[0, 320\)"):
        tiny.generate(ids(5, 320), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_model_len"):
        tiny.generate({"prompt_token_ids": [5] * 1024}, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="whole KV cache"):
        tiny.generate({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny.generate("text needs a tokenizer", SamplingParams(max_tokens=2))
    # A batch with one bad prompt submits nothing; the engine keeps serving.
    with pytest.raises(ValueError):
        tiny.generate([ids(5, 6), ids()], SamplingParams(max_tokens=2))
    assert_all_blocks_free(tiny)
    out = tiny.generate(ids(5, 6), SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_unsupported_architecture_lists_supported(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_missing_model_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="local directory"):
        LLM(str(tmp_path / "nope"))


@pytest.mark.slow
def test_stop_strings_and_chat_on_smollm2(smol_llm, assert_all_blocks_free):
    prompt = "1, 2, 3, 4, 5,"
    full = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert " 8" in full.text
    out = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[" 8"]))[0]
    assert out.outputs[0].text == full.text[: full.text.index(" 8")]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == " 8"
    chat = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=20),
    )[0]
    assert "Paris" in chat.outputs[0].text
    assert_all_blocks_free(smol_llm)


@pytest.mark.slow
def test_multibyte_utf8_streams_whole_characters(smol_llm):
    """Incremental text equals a one-shot decode even for multi-byte characters."""
    text = "日本語のテキスト — naïve café 🙂"
    token_ids = smol_llm.tokenizer.encode(text)
    from kvmesh.replicas.detokenizer import Detokenizer

    detok = Detokenizer(smol_llm.tokenizer.backend_tokenizer, [1], [])
    pieces = []
    for t in token_ids:
        detok.add_token(t)
        pieces.append(detok.delta(False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
