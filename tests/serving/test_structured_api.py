"""Structured output and tool calling over HTTP, with the ``openai`` client unchanged.

The served models are tiny random llamas: whatever they emit inside a JSON value is the
grammar's doing, so every schema here bounds its strings (``maxLength``, enums): a random
model never closes an unbounded string by itself.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow

MODEL = "tiny"


class Weather(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    celsius: int = Field(ge=-40, le=50)
    sunny: bool


class Ticket(BaseModel):
    # No extra keys: without this the schema allows any other property, and a sampled run
    # can spend all of max_tokens on one long free string.
    model_config = ConfigDict(extra="forbid")

    priority: Literal["low", "high"]
    code: str = Field(max_length=6)
    count: int = Field(ge=0, le=9)


WEATHER_TOOL = openai.pydantic_function_tool(Weather, name="get_weather")
TICKET_TOOL = openai.pydantic_function_tool(Ticket, name="open_ticket")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key=serve_app.api_key, timeout=60)


def test_parse_with_a_pydantic_response_format(oai):
    for seed in range(3):
        done = oai.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Weather, max_tokens=256, seed=seed
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Weather)


def test_json_object_regex_choice_and_guided_fields(oai):
    out = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    # json_object with a random model may be cut by max_tokens; when it stops, it parses.
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    regex = oai.completions.create(
        model=MODEL,
        prompt="Phone:",
        max_tokens=16,
        extra_body={"structured_outputs": {"regex": r"\+\d{2} \d{4}"}},
    )
    assert re.fullmatch(r"\+\d{2} \d{4}", regex.choices[0].text)
    assert regex.choices[0].finish_reason == "stop"
    choice = oai.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].message.content in ("yes", "no")
    schema = Ticket.model_json_schema()
    guided = oai.completions.create(
        model=MODEL,
        prompt="Ticket:",
        max_tokens=256,
        seed=7,
        extra_body={"guided_json": schema},
    )
    assert guided.choices[0].finish_reason == "stop"
    Ticket.model_validate_json(guided.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_tool_round_trip(oai, stream, tool_choice):
    """The model is made to call a tool; the client answers with a ``tool`` message and the
    model continues, streaming and not."""
    choice = (
        {"type": "function", "function": {"name": "open_ticket"}}
        if tool_choice == "named"
        else "required"
    )
    kwargs = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER_TOOL, TICKET_TOOL],
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=256,
    )
    if stream:
        with oai.beta.chat.completions.stream(**kwargs) as events:
            for _ in events:
                pass
            done = events.get_final_completion()
    else:
        done = oai.chat.completions.parse(**kwargs)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    if tool_choice == "named":
        assert call.function.name == "open_ticket"
    parsed = call.function.parsed_arguments
    assert isinstance(parsed, Weather if call.function.name == "get_weather" else Ticket)
    assert call.id.startswith("call_")

    follow_up = oai.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"result": "done"}'},
        ],
        tools=[WEATHER_TOOL, TICKET_TOOL],
        max_tokens=8,
    )
    assert follow_up.choices[0].finish_reason in ("stop", "length")
    assert follow_up.choices[0].message.role == "assistant"


BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "response_format",
        "invalid JSON schema",
    ),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", "invalid grammar"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, None, "at most one way"),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema is required"),
    (
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        None,
        "is not in tools",
    ),
    ({"tool_choice": "required"}, None, "needs tools"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        None,
        "tool_call_id: required",
    ),
]


@pytest.mark.parametrize(("extra", "param", "text"), BAD)
def test_bad_structure_requests_are_400_with_an_openai_error_body(serve_app, extra, param, text):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    with httpx.Client(timeout=60) as client:
        r = client.post(
            f"{serve_app.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {serve_app.api_key}"},
        )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert text in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_the_models_calls(oai, stream):
    """With ``tool_choice="auto"`` the model's own text is parsed for calls (the Hermes
    parser: the tiny model's template knows no tools). A random model never writes a call
    by itself, so a regex makes it write one, preceded by text that stays content."""
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "celsius": 3, "sunny": true}}'
    kwargs = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER_TOOL, TICKET_TOOL],
        max_tokens=96,
        extra_body={"guided_regex": re.escape(f"Sure.<tool_call>\n{call}\n</tool_call>")},
    )
    if stream:
        with oai.beta.chat.completions.stream(**kwargs) as events:
            kinds = {type(event).__name__ for event in events}
            done = events.get_final_completion()
        assert "ContentDeltaEvent" in kinds and "FunctionToolCallArgumentsDeltaEvent" in kinds
    else:
        done = oai.chat.completions.parse(**kwargs)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert message.content == "Sure."
    (tool_call,) = message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert tool_call.function.parsed_arguments == Weather(city="Oslo", celsius=3, sunny=True)
