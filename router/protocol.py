"""OpenAI request schemas, strict: unknown fields and wrongly typed values are 400s.

Strict mode means ``"max_tokens": "5"`` or ``"stream": 1`` is rejected rather than coerced (an
integer is still a valid float, as in JSON). Beyond OpenAI's fields we accept vLLM's
``top_k``, ``min_p``, ``ignore_eos``, ``min_tokens`` and ``repetition_penalty``: load
generators use them to force output lengths.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class CompletionRequest(_SamplingRequest):
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


class ChatCompletionRequest(_SamplingRequest):
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
