"""A chat completion's tool calls, as OpenAI's API returns them: whole or streamed.

The ingress knows which tool mode a request is in (``ChatCompletionRequest.tool_mode``):
``none`` (plain text), ``auto`` (the model may call; the model family's parser finds the calls
in its text), ``required`` (the grammar made the output a JSON list of calls) or a function's
name (the output is that function's arguments). Streamed calls are deltas the ``openai``
client assembles: the first delta of a call carries its index, id, type and name, the
following ones pieces of ``function.arguments``.
"""

from __future__ import annotations

from typing import Any

from kvmesh.replicas.tool_calls import (
    ParserName,
    StreamingToolParser,
    ToolCall,
    forced_calls,
    parse,
)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """``tool_calls`` when the model ended by calling; a cut-off call stays ``length``."""
    return "tool_calls" if called and reason == "stop" else reason


def chat_message(text: str, mode: str, parser: ParserName) -> tuple[dict[str, Any], bool]:
    """(the assistant message, whether it calls tools) for a finished generation."""
    if mode == "none":
        return {"role": "assistant", "content": text}, False
    if mode == "auto":
        content, calls = parse(parser, text)
    else:
        calls = forced_calls(text, mode)
        content = None if calls else text  # an unparsable (cut-off) list stays visible
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return message, bool(calls)


def _call_delta(index: int, call: ToolCall, arguments: str) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments},
            }
        ]
    }


class ToolDeltaStream:
    """Turns a stream's text deltas into chat-chunk deltas for its tool mode."""

    def __init__(self, mode: str, parser: ParserName) -> None:
        self.mode = mode
        self.num_calls = 0
        self._parser = StreamingToolParser(parser) if mode == "auto" else None
        self._named: ToolCall | None = None
        self._buffer: list[str] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self._parser is not None:
            content, calls = self._parser.feed(text)
            return self._deltas(content, calls)
        if self.mode == "required":  # a JSON list: parsed once it is whole
            self._buffer.append(text)
            return []
        # A named function: the output is its arguments, streamed as they come.
        if self._named is None:
            self._named = ToolCall(self.mode, "")
            self.num_calls = 1
            return [_call_delta(0, self._named, text)]
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]

    def finish(self) -> list[dict[str, Any]]:
        if self._parser is not None:
            return self._deltas(*self._parser.finish())
        if self.mode == "required":
            text = "".join(self._buffer)
            calls = forced_calls(text, "required")
            return self._deltas("" if calls else text, calls)
        return []

    def _deltas(self, content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"content": content}] if content else []
        for call in calls:
            deltas.append(_call_delta(self.num_calls, call, call.arguments))
            self.num_calls += 1
        return deltas
