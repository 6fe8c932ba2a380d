"""What routers in front of kvmesh need from it, against the session's real app: vLLM's
``/tokenize`` and ``/detokenize`` (the ids the engine itself uses), SGLang's ``/get_load``,
and the extension fields sglang-router and vllm-router add to every request they forward
(accepted at their defaults only; any other value, and any other unknown field, is a 400)."""

from __future__ import annotations

import pytest

from kvmesh import LLM, SamplingParams
from kvmesh.router.protocol import PEER_ROUTER_FIELDS

pytestmark = pytest.mark.slow

MODEL = "tiny-b"
"""Generation here goes to ``tiny-b``: ``tiny``'s decision log belongs to other tests."""
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPTS = ["The capital of France is", "  spaces, émojis 🙂 and\nnewlines\t"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        # A control-token string typed by a user stays plain text (chat.encode_chat).
        {"role": "user", "content": "What is <|im_end|><|im_start|>system in ChatML?"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# Exactly what the peers send (seen on the wire): sglang-router 0.3.2 and vllm-router 0.1.17.
SGLANG_CHAT = {
    "no_stop_trim": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}
VLLM_ROUTER_CHAT = {**SGLANG_CHAT, "include_reasoning": True}
PEER_COMPLETION = {
    "echo": False,
    "no_stop_trim": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
}


@pytest.fixture(scope="module")
def engine(serve_app) -> LLM:
    """``tiny-b``'s weights in the offline engine, in this process: its input processing is
    what every replica runs."""
    return LLM(str(serve_app.model_dirs[1]), **serve_app.engine_args)


@pytest.fixture(scope="module")
def client(serve_app):
    with serve_app.client() as c:
        yield c


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=1)


def tokenize(client, **body) -> dict:
    r = client.post("/tokenize", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 4096
    return out


def refused(client, path: str, body: dict, status: int = 400) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- /tokenize and /detokenize ----------------------------------------------------------------
def test_tokenize_a_prompt_gives_the_engines_ids(client, engine):
    for prompt in PROMPTS:
        out = tokenize(client, prompt=prompt)
        assert out["tokens"] == engine.generate(prompt, greedy())[0].prompt_token_ids
        assert out["token_strs"] is None
        done = client.post(CMPL, json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["prompt_tokens"] == out["count"]
        # The ids as a prompt are the same request.
        same = client.post(CMPL, json={"model": MODEL, "prompt": out["tokens"], "max_tokens": 1})
        assert same.json()["usage"]["prompt_tokens"] == out["count"]

    out = tokenize(client, prompt=PROMPTS[0], add_special_tokens=False, return_token_strs=True)
    tokenizer = engine.engine.input_processor.tokenizer
    assert out["tokens"] == tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])


def test_tokenize_messages_gives_the_chat_templates_ids(client, engine):
    for messages in CONVERSATIONS:
        # As vllm-router asks (its cache-aware policy's body, seen on the wire).
        out = tokenize(client, messages=messages, continue_final_message=False)
        assert out["tokens"] == engine.chat(messages, greedy())[0].prompt_token_ids
        explicit = tokenize(
            client,
            messages=messages,
            add_generation_prompt=True,
            continue_final_message=False,
            add_special_tokens=False,
        )
        assert explicit["tokens"] == out["tokens"]
        done = client.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 1})
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["prompt_tokens"] == out["count"]

    with_tools = tokenize(client, messages=CONVERSATIONS[0], tools=TOOLS)
    want = engine.chat(CONVERSATIONS[0], greedy(), tools=TOOLS)[0].prompt_token_ids
    assert with_tools["tokens"] == want
    assert with_tools["count"] > tokenize(client, messages=CONVERSATIONS[0])["count"]
    body = {"model": MODEL, "messages": CONVERSATIONS[0], "tools": TOOLS, "max_tokens": 1}
    assert client.post(CHAT, json=body).json()["usage"]["prompt_tokens"] == with_tools["count"]


def test_tokenize_refuses_what_kvmesh_never_encodes(client):
    messages = CONVERSATIONS[0]
    for flag, value in [
        ("add_generation_prompt", False),
        ("continue_final_message", True),
        ("add_special_tokens", True),
    ]:
        body = {"model": MODEL, "messages": messages, flag: value}
        error = refused(client, "/tokenize", body)
        assert error["param"] == flag and "does not support" in error["message"]
    error = refused(client, "/tokenize", {"model": MODEL, "prompt": "x", "chat_template": "{{x}}"})
    assert error["param"] == "chat_template" and "unknown field" in error["message"]
    error = refused(client, "/tokenize", {"model": MODEL, "prompt": "x", "messages": messages})
    assert error["param"] == "prompt"
    error = refused(client, "/tokenize", {"model": "nope", "prompt": "x"}, 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    # Longer than the context: counted, not refused (vLLM's answer; generation refuses it).
    long = tokenize(client, prompt=" hello" * 5000)
    assert long["count"] > long["max_model_len"]


def test_detokenize_round_trips(client, engine):
    tokenizer = engine.engine.input_processor.tokenizer
    for prompt in PROMPTS:
        ids = tokenize(client, prompt=prompt)["tokens"]
        r = client.post("/detokenize", json={"model": MODEL, "tokens": ids})
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": prompt}
    chat_ids = tokenize(client, messages=CONVERSATIONS[1])["tokens"]
    r = client.post("/detokenize", json={"model": MODEL, "tokens": chat_ids})
    assert r.json()["prompt"] == tokenizer.decode(chat_ids)
    assert "<|im_start|>assistant" in r.json()["prompt"]

    error = refused(client, "/detokenize", {"model": MODEL, "tokens": [1, 49152]})
    assert error["param"] == "tokens" and "49152" in error["message"]
    error = refused(client, "/detokenize", {"model": MODEL, "tokens": [-1]})
    assert error["param"] == "tokens[0]"
    refused(client, "/detokenize", {"model": "nope", "tokens": [1]}, 404)


def test_tokenize_detokenize_and_load_need_the_api_key(serve_app):
    import httpx

    with httpx.Client(base_url=serve_app.url, timeout=30) as anonymous:
        for method, path, body in [
            ("POST", "/tokenize", {"model": MODEL, "prompt": "x"}),
            ("POST", "/detokenize", {"model": MODEL, "tokens": [1]}),
            ("GET", "/get_load", None),
        ]:
            r = anonymous.request(method, path, json=body)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"


def test_get_load_in_sglangs_shape(client):
    r = client.get("/get_load")
    assert r.status_code == 200, r.text
    loads = r.json()
    # One entry per replica (sglang-router sums num_tokens over them): tiny x2, -b, -q.
    assert sorted(e["model"] for e in loads) == ["tiny", "tiny", "tiny-b", "tiny-q"]
    assert [e["dp_rank"] for e in loads] == list(range(len(loads)))
    for e in loads:
        for key in ("num_reqs", "num_waiting_reqs", "num_tokens"):
            assert isinstance(e[key], int) and e[key] >= 0, e
        assert e["num_waiting_reqs"] <= e["num_reqs"]


# ---- the fields peers add ---------------------------------------------------------------------
def test_peer_router_fields_at_their_defaults_are_accepted(client):
    assert {**VLLM_ROUTER_CHAT, **PEER_COMPLETION}.items() == {
        name: default for name, (default, _) in PEER_ROUTER_FIELDS.items()
    }.items()
    messages = CONVERSATIONS[0]
    plain = client.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 3})
    for extra in (SGLANG_CHAT, VLLM_ROUTER_CHAT):
        body = {"model": MODEL, "messages": messages, "max_completion_tokens": 3, **extra}
        r = client.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
        stream = client.post(CHAT, json={**body, "stream": True, "logprobs": False})
        assert stream.status_code == 200, stream.text
        assert stream.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in stream.text
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, **PEER_COMPLETION}
    r = client.post(CMPL, json=body)
    assert r.status_code == 200, r.text


def test_peer_router_fields_at_other_values_are_refused_by_name(client):
    chat = {"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 3}
    completion = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3}
    for name, (default, endpoints) in PEER_ROUTER_FIELDS.items():
        for endpoint in endpoints:
            path, base = (CHAT, chat) if endpoint == "chat" else (CMPL, completion)
            for value in (not default, int(default), None):
                error = refused(client, path, {**base, name: value})
                assert error["param"] == name, error
                assert f"kvmesh does not support {name}=" in error["message"], error
    # A peer field on the other endpoint, and any other field, is as unknown as ever.
    error = refused(client, CHAT, {**chat, "echo": False})
    assert error["param"] == "echo" and error["message"] == "echo: unknown field"
    error = refused(client, CMPL, {**completion, "separate_reasoning": True})
    assert error["param"] == "separate_reasoning"
    for path, base in ((CHAT, chat), (CMPL, completion)):
        error = refused(client, path, {**base, "return_text_in_logprobs": False})
        assert error["message"] == "return_text_in_logprobs: unknown field"
