"""OpenAI request schemas, strict: unknown fields and wrongly typed values are 400s.

Strict mode means ``"max_tokens": "5"`` or ``"stream": 1`` is rejected rather than coerced (an
integer is still a valid float, as in JSON). Beyond OpenAI's fields we accept vLLM's
``top_k``, ``min_p``, ``ignore_eos``, ``min_tokens`` and ``repetition_penalty``: load
generators use them to force output lengths. ``PEER_ROUTER_FIELDS`` are fields that routers
in front of kvmesh add to every request: accepted at their no-op defaults only. The bodies of
vLLM's ``/tokenize`` and ``/detokenize`` are here too (``router.tokenize_api`` answers them).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    create_model,
    model_validator,
)

from kvmesh.replicas.sampling_params import API_BOUNDS, SamplingParams
from kvmesh.replicas.structured.params import MAX_CHOICES, StructuredOutputsParams
from kvmesh.replicas.tool_calls import forced_schema

# Fixed caps on one request's shape (the configurable ones, bytes, prompts and prompt tokens
# per request, are in ``router.limits``). Each keeps one request from costing the server
# out of proportion to what it asks for: stop strings are searched after every token,
# message parts and names are copied through the chat template.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
MAX_NAME_CHARS = 256
MAX_PROMPTS = 1024
MAX_TOOLS = 128
"""A hard ceiling on a prompt list; ``limits.max_prompts_per_request`` is usually lower."""


class _Strict(BaseModel):
    # NaN and infinities are not JSON, and no field means anything by them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Routers put in front of OpenAI-compatible servers (sglang-router, vllm-router) re-serialise
# every request with SGLang / vLLM extension fields set to these values (seen on the wire from
# sglang-router 0.3.2 and vllm-router 0.1.17), and vLLM's own server ignores fields it does not
# know. At these values each asks for what kvmesh does anyway (special tokens skipped, stop
# strings trimmed, no reasoning parser, no hidden states, the assistant cue appended, no echo),
# so they are accepted and ignored; any other value is a 400 naming the field, and every other
# unknown field stays a 400. Field -> (the one value accepted, the endpoints it goes with).
PEER_ROUTER_FIELDS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "no_stop_trim": (False, ("completions", "chat")),
    "skip_special_tokens": (True, ("completions", "chat")),
    "return_hidden_states": (False, ("completions", "chat")),
    "continue_final_message": (False, ("chat",)),
    "separate_reasoning": (True, ("chat",)),
    "stream_reasoning": (True, ("chat",)),
    "include_reasoning": (True, ("chat",)),  # vllm-router only
    "echo": (False, ("completions",)),  # OpenAI's own field; kvmesh never echoes the prompt
}


def _only(name: str, default: bool, why: str):
    """A before-validator: ``default`` passes, anything else is a 400 naming ``name``."""

    def check(value: Any) -> Any:
        if type(value) is not bool or value != default:
            raise ValueError(
                f"{name}: kvmesh does not support {name}={json.dumps(value)[:32]}; only "
                f"{json.dumps(default)} ({why})"
            )
        return value

    return BeforeValidator(check)


def _peer_router_fields(endpoint: str) -> type[_Strict]:
    """A base model holding ``endpoint``'s ``PEER_ROUTER_FIELDS`` (so the OpenAPI document
    shows them, each with its one accepted value)."""
    fields: dict[str, Any] = {
        name: (
            Annotated[Literal[default], _only(name, default, "its default, ignored")],  # type: ignore[valid-type]
            Field(
                default=default,
                description="Accepted only at this value, and ignored: routers in front of "
                "kvmesh (sglang-router, vllm-router) add it to every request.",
            ),
        )
        for name, (default, endpoints) in PEER_ROUTER_FIELDS.items()
        if endpoint in endpoints
    }
    return create_model(f"_PeerRouter{endpoint.title()}Fields", __base__=_Strict, **fields)


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
ShortName = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputsBody(_Strict):
    """vLLM's ``structured_outputs``: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_format(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError(
                "response_format: json_schema is required with type json_schema, and only there"
            )
        return self


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    # Ranges: the engine's own (``SamplingParams``), from one table.
    max_tokens: int | None = Field(default=None, **API_BOUNDS["max_tokens"].field())
    temperature: float | None = Field(default=None, **API_BOUNDS["temperature"].field())
    top_p: float | None = Field(default=None, **API_BOUNDS["top_p"].field())
    top_k: int | None = Field(default=None, **API_BOUNDS["top_k"].field())
    min_p: float | None = Field(default=None, **API_BOUNDS["min_p"].field())
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, **API_BOUNDS["seed"].field())
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=None, **API_BOUNDS["presence_penalty"].field())
    frequency_penalty: float | None = Field(default=None, **API_BOUNDS["frequency_penalty"].field())
    repetition_penalty: float | None = Field(
        default=None, **API_BOUNDS["repetition_penalty"].field()
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: ShortName | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, **API_BOUNDS["min_tokens"].field())
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and guided_*.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Annotated[str, Field(min_length=1)] | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _check_common(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.top_k == 0:
            raise ValueError("top_k: must be -1 (disabled) or at least 1")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def deterministic(self) -> bool:
        """Greedy or seeded: the same request gives the same tokens (response-cacheable)."""
        return self.temperature == 0.0 or self.seed is not None

    @cached_property
    def structured_spec(self) -> tuple[str, StructuredOutputsParams] | None:
        """(the field it came from, what it asks for), or None; more than one is a
        ``ValueError``: they would contradict each other. Worked out once per request (a
        forced tool call builds a schema from the tools): the sampling parameters and the
        ingress's compile check both read it."""
        found: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
            found.append(("response_format", {"json": schema}))
        if self.structured_outputs is not None:
            body = self.structured_outputs.model_dump(by_alias=True, exclude_defaults=True)
            found.append(("structured_outputs", body))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                found.append((f"guided_{name}", {name: value}))
        found += self.extra_structured()
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise ValueError(f"{names}: give at most one way of constraining the output")
        name, kwargs = found[0]
        try:
            return name, StructuredOutputsParams(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def extra_structured(self) -> list[tuple[str, dict[str, Any]]]:
        """Constraints an endpoint adds of its own (chat: a forced tool call)."""
        return []

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        spec = self.structured_spec
        return SamplingParams(
            structured_outputs=spec[1] if spec else None,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
        )


TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(_peer_router_fields("completions"), _SamplingRequest):
    prompt: Prompt
    logprobs: int | None = Field(default=None, **API_BOUNDS["logprobs"].field())

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one per choice (a string or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        # OpenAI's default for completions is 16 tokens.
        return self._sampling(16 if self.max_tokens is None else self.max_tokens, self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionCallBody(_Strict):
    name: FunctionName
    arguments: str


class ToolCallBody(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)] | None
    ) = None
    name: ShortName | None = None
    tool_calls: Annotated[list[ToolCallBody], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: ShortName | None = None

    @model_validator(mode="after")
    def _check_message(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: required for a {self.role} message")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: required for a tool message, and only there")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_peer_router_fields("chat"), _SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(default=None, **API_BOUNDS["max_tokens"].field())
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, **API_BOUNDS["logprobs"].field())
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if (
            isinstance(self.tool_choice, NamedToolChoice)
            and self.tool_choice.function.name not in names
        ):
            raise ValueError(
                f"tool_choice: function {self.tool_choice.function.name!r} is not in tools"
            )
        return self

    @property
    def tool_mode(self) -> str:
        """``none`` (no tools offered), ``auto``, ``required``, or the named function."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools offered to the model (none when ``tool_choice`` is ``none``)."""
        if self.tool_mode == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def extra_structured(self) -> list[tuple[str, dict[str, Any]]]:
        mode = self.tool_mode
        if mode in ("none", "auto"):
            return []
        schema = forced_schema(self.tool_dicts() or [], mode, self.parallel_tool_calls)
        return [("tool_choice", {"json": schema})]

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them (text content, tool turns)."""
        return [m.for_template() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        # No limit by default: the replica caps it at what fits the context and the KV cache.
        limit = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(limit, logprobs)


# ---- vLLM's /tokenize and /detokenize -------------------------------------------------------
# A conversation is tokenised only as /v1/chat/completions tokenises it (assistant cue, no
# added special tokens): other flags would give ids no kvmesh request is ever given, so they
# are refused by name rather than answered.
_CHAT_ENCODING = "what kvmesh's chat completions use"


class TokenizeCompletionRequest(_Strict):
    """A prompt, tokenised as ``/v1/completions`` tokenises it (``add_special_tokens``
    true); false leaves the tokenizer's special tokens (a BOS, say) out."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """A conversation through the model's chat template, as ``/v1/chat/completions`` renders it
    (with the assistant cue, and ``tools`` when given)."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: Annotated[
        Literal[True], _only("add_generation_prompt", True, _CHAT_ENCODING)
    ] = True
    continue_final_message: Annotated[
        Literal[False], _only("continue_final_message", False, _CHAT_ENCODING)
    ] = False
    add_special_tokens: Annotated[
        Literal[False], _only("add_special_tokens", False, _CHAT_ENCODING)
    ] = False
    return_token_strs: bool = False
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


def _tokenize_form(body: Any) -> str:
    """The form a ``/tokenize`` body is in (its tag): messages if it has them, else a prompt."""
    return (
        "tokenize-messages" if isinstance(body, dict) and "messages" in body else "tokenize-prompt"
    )


class TokenizeRequest(
    RootModel[
        Annotated[
            Annotated[TokenizeCompletionRequest, Tag("tokenize-prompt")]
            | Annotated[TokenizeChatRequest, Tag("tokenize-messages")],
            Discriminator(_tokenize_form),
        ]
    ]
):
    """vLLM's ``/tokenize`` body: a prompt, or messages (the form with ``messages``)."""


class DetokenizeRequest(_Strict):
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    tokens: list[TokenId]
