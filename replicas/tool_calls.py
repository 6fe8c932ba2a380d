"""Tool calling: tools into the prompt, the grammar that forces a call, calls out of the text.

Three jobs, each small:

- **Rendering.** Tools and the tool turns of a conversation (assistant ``tool_calls``,
  ``tool`` results) go through the model's chat template when the template knows tools.
  When it does not (many small models), the tools are described in a system message in the
  Hermes convention (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), earlier
  calls are written the same way and results come back as ``<tool_response>`` user turns, so
  any chat model can be offered tools and read its own earlier calls.
- **Forcing.** ``tool_choice="required"`` or a named function is enforced by a JSON schema
  (``forced_schema``): the output is the named function's arguments, or a list of
  ``{"name", "parameters"}`` objects for ``required``. The grammar guarantees it parses.
- **Parsing.** ``tool_choice="auto"`` leaves the model free; a parser chosen per model
  family (``hermes``: ``<tool_call>`` JSON, Qwen and Hermes models; ``llama3_json``: a bare
  ``{"name", "parameters"}`` object, Llama 3.x) finds the calls in its text, whole
  (``parse``) or while it streams (``StreamingToolParser``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolChoice = Literal["none", "auto", "required"] | str
"""``none``, ``auto``, ``required``, or a function's name (a named choice)."""
ParserName = Literal["hermes", "llama3_json"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text (what OpenAI's API carries)."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


# ---- rendering -------------------------------------------------------------------------------
def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the chat template renders a ``tools`` list itself."""
    return bool(chat_template) and "tools" in chat_template  # type: ignore[operator]


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool)


def _tools_system_text(tools: list[dict[str, Any]]) -> str:
    signatures = "\n".join(json.dumps(_function(t), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help with the user's request. The functions you can "
        f"call are described in JSON inside <tools></tools>:\n<tools>\n{signatures}\n</tools>\n"
        "To call a function, answer with a JSON object holding its name and its arguments "
        f"inside {HERMES_OPEN}{HERMES_CLOSE} tags, one per call:\n"
        f'{HERMES_OPEN}\n{{"name": <function name>, "arguments": <arguments as a JSON '
        f"object>}}\n{HERMES_CLOSE}"
    )


def _hermes_call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        arguments = fn.get("arguments")
    body = json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) as the chat template should get them.

    A template that knows tools gets both as they are (arguments as objects, as HF templates
    expect). For one that does not, tool turns become plain text in the Hermes convention and
    the tool list a system message; the returned tools are then None.
    """
    if template_knows_tools(template):
        shaped = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments_object(c)}}
                    for c in m["tool_calls"]
                ]
            shaped.append(m)
        return shaped, tools
    shaped = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_hermes_call_text(c) for c in m["tool_calls"])
            shaped.append({"role": "assistant", "content": f"{content}\n{calls}".strip()})
        elif role == "tool":
            shaped.append(
                {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
            )
        else:
            shaped.append({"role": role, "content": content})
    if tools:
        text = _tools_system_text(tools)
        if shaped and shaped[0]["role"] in ("system", "developer"):
            shaped[0] = {**shaped[0], "content": f"{shaped[0]['content']}\n\n{text}"}
        else:
            shaped.insert(0, {"role": "system", "content": text})
    return shaped, None


def _arguments_object(call: dict[str, Any]) -> Any:
    try:
        return json.loads(call["function"].get("arguments") or "{}")
    except ValueError:
        return call["function"].get("arguments")


# ---- forcing ---------------------------------------------------------------------------------
def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return _function(tool).get("parameters") or {"type": "object", "properties": {}}


def forced_schema(
    tools: list[dict[str, Any]], choice: ToolChoice, parallel: bool = True
) -> dict[str, Any]:
    """The JSON schema an output must follow for a ``required`` or named tool choice."""
    if choice not in ("required", "auto", "none"):
        return _parameters(find_tool(tools, choice))
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [_function(t)["name"]]},
                    "parameters": _parameters(t),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": one_call}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def find_tool(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if _function(tool).get("name") == name:
            return tool
    raise ValueError(f"tool_choice names function {name!r}, which is not in tools")


def forced_calls(text: str, choice: ToolChoice) -> list[ToolCall]:
    """The calls in a forced output (the grammar made it parse, unless it was cut short)."""
    if choice not in ("required", "auto", "none"):
        return [ToolCall(choice, text.strip())]
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [
        ToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
        for item in items
        if isinstance(item, dict) and "name" in item and "parameters" in item
    ]


# ---- parsing (tool_choice="auto") ------------------------------------------------------------
def pick_parser(configured: str, chat_template: str | None) -> ParserName:
    """The parser for a model: the configured one, or (``auto``) the family its chat
    template shows: ``<|python_tag|>`` / ipython → Llama 3 JSON; otherwise Hermes, which is
    also how tools are offered to a template that knows none."""
    if configured != "auto":
        return configured  # type: ignore[return-value]
    template = chat_template or ""
    if PYTHON_TAG in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def _call_from_json(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        return ToolCall(obj["name"], arguments)
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.S)


def _parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    calls: list[ToolCall] = []
    content_parts: list[str] = []
    last = 0
    for match in _HERMES_CALL.finditer(text):
        try:
            call = _call_from_json(json.loads(match.group(1)), "arguments")
        except ValueError:
            call = None
        if call is None:  # not a call after all: keep it as text
            continue
        content_parts.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    content_parts.append(text[last:])
    content = "".join(content_parts).strip()
    return (content or None) if calls else text, calls


def _parse_llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call_from_json(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return None, calls


def parse(parser: ParserName, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; no calls: the text is all content."""
    return _parse_hermes(text) if parser == "hermes" else _parse_llama3(text)


class StreamingToolParser:
    """Splits a streamed output into content deltas and whole tool calls as they complete.

    ``feed`` returns the content that can be shown now and the calls that just closed; text
    that may be the start of a call is held back until it is clear. ``finish`` flushes the
    rest (an unclosed call is given back as content: nothing the model wrote is lost).
    """

    def __init__(self, parser: ParserName) -> None:
        self.parser = parser
        self.buffer = ""
        self.num_calls = 0
        self._llama_call: bool | None = None  # decided by the first non-space characters

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.buffer += delta
        if self.parser == "llama3_json":
            return self._feed_llama3()
        return self._feed_hermes()

    def _feed_hermes(self) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        while True:
            start = self.buffer.find(HERMES_OPEN)
            if start < 0:
                # Hold back a tail that could still become "<tool_call>".
                keep = _partial_suffix(self.buffer, HERMES_OPEN)
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return content, calls
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(HERMES_CLOSE)
            if end < 0:
                return content, calls
            block = self.buffer[: end + len(HERMES_CLOSE)]
            self.buffer = self.buffer[end + len(HERMES_CLOSE) :]
            _, found = _parse_hermes(block)
            if found:
                calls += found
            else:
                content += block
            self.num_calls += len(found)

    def _feed_llama3(self) -> tuple[str, list[ToolCall]]:
        if self._llama_call is None:
            head = self.buffer.lstrip()
            if not head:
                return "", []
            if len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head):
                return "", []
            self._llama_call = head.startswith(("{", PYTHON_TAG))
        if self._llama_call:
            return "", []  # a call: parsed whole at the end
        out, self.buffer = self.buffer, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self.buffer = self.buffer, ""
        if self.parser == "llama3_json" and self._llama_call:
            content, calls = _parse_llama3(rest)
            self.num_calls += len(calls)
            return content or "", calls
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
