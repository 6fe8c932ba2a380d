"""Tool calls in and out of the text: rendering for templates without tools, the forced
schema, and the per-family parsers, whole and streamed (split at every position)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvmesh.replicas.tool_calls import (
    StreamingToolParser,
    forced_calls,
    forced_schema,
    parse,
    pick_parser,
    render_messages,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
HERMES = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>'
)
LLAMA = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
    '{"name": "now", "parameters": {}}'
)


def _names_and_args(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


EXPECTED = [("get_weather", {"city": "Oslo"}), ("now", {})]


@pytest.mark.parametrize(("parser", "text"), [("hermes", HERMES), ("llama3_json", LLAMA)])
def test_whole_output_parsers(parser, text):
    content, calls = parse(parser, text)
    assert _names_and_args(calls) == EXPECTED
    assert content == ("Let me check." if parser == "hermes" else None)
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_plain_text_is_all_content(parser):
    text = "Oslo is cold today, < tool_call > is not a tag, {braces} neither."
    content, calls = parse(parser, text)
    assert calls == [] and content == text


@pytest.mark.parametrize(("parser", "text"), [("hermes", HERMES), ("llama3_json", LLAMA)])
def test_streaming_parser_gives_the_same_calls_at_every_split(parser, text):
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            stream = StreamingToolParser(parser)
            content, calls = "", []
            for piece in pieces:
                c, found = stream.feed(piece)
                content += c
                calls += found
            c, found = stream.finish()
            content += c
            calls += found
            assert _names_and_args(calls) == EXPECTED, (cut, pieces[:2])
            assert content.strip() == ("Let me check." if parser == "hermes" else "")


def test_streaming_unclosed_call_is_given_back_as_text():
    stream = StreamingToolParser("hermes")
    shown, _ = stream.feed('Hi <tool_call>{"name": "now"')
    rest, calls = stream.finish()
    assert calls == [] and shown + rest == 'Hi <tool_call>{"name": "now"'


def test_forced_schema_required_and_named():
    schema = forced_schema(TOOLS, "required", parallel=False)
    good = [{"name": "get_weather", "parameters": {"city": "Lima"}}]
    jsonschema.validate(good, schema)
    for bad in ([], good * 2, [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert forced_schema(TOOLS, "get_weather") == TOOLS[0]["function"]["parameters"]
    assert forced_schema(TOOLS, "now") == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="not in tools"):
        forced_schema(TOOLS, "missing")
    assert _names_and_args(forced_calls(json.dumps(good), "required")) == [
        ("get_weather", {"city": "Lima"})
    ]
    assert forced_calls('{"city": "Lima"}', "get_weather")[0].arguments == '{"city": "Lima"}'
    assert forced_calls('[{"name": "get_weather", "param', "required") == []  # cut short


def test_templates_without_tools_get_hermes_text():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    shaped, tools = render_messages(messages, TOOLS, "{{ messages }}")
    assert tools is None
    assert shaped[0]["role"] == "system" and '"name": "get_weather"' in shaped[0]["content"]
    assert shaped[2]["content"].startswith("<tool_call>\n")
    assert parse("hermes", shaped[2]["content"])[1][0].name == "get_weather"
    assert shaped[3] == {"role": "user", "content": "<tool_response>\n-3 C\n</tool_response>"}
    # A template that knows tools gets them as they are, arguments as objects.
    shaped, tools = render_messages(messages, TOOLS, "{% for t in tools %}{% endfor %}")
    assert tools == TOOLS
    assert shaped[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_parser_follows_the_template_family():
    assert pick_parser("auto", "{{ '<|python_tag|>' }}") == "llama3_json"
    assert pick_parser("auto", "<tool_call> ...") == "hermes"
    assert pick_parser("auto", None) == "hermes"
    assert pick_parser("llama3_json", "<tool_call>") == "llama3_json"
