"""OpenAI request schemas, strict: unknown fields and wrongly typed values are 400s.

Strict mode means ``"max_tokens": "5"`` or ``"stream": 1`` is rejected rather than coerced (an
integer is still a valid float, as in JSON). Beyond OpenAI's fields we accept vLLM's
``top_k``, ``min_p``, ``ignore_eos``, ``min_tokens`` and ``repetition_penalty``: load
generators use them to force output lengths.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmesh.replicas.sampling_params import API_BOUNDS, SamplingParams

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
"""A hard ceiling on a prompt list; ``limits.max_prompts_per_request`` is usually lower."""


class _Strict(BaseModel):
    # NaN and infinities are not JSON, and no field means anything by them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
ShortName = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class StreamOptions(_Strict):
    include_usage: bool = False


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

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
    name: ShortName | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(default=None, **API_BOUNDS["max_tokens"].field())
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, **API_BOUNDS["logprobs"].field())

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (text content only)."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        # No limit by default: the replica caps it at what fits the context and the KV cache.
        limit = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(limit, logprobs)
