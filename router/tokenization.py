"""What the ingress knows about each served model: the engine's own input processor.

The ingress tokenises so that requests reach replicas as token ids with their prefix-block
hashes (what a prefix-aware router matches on) and so that over-long prompts are refused before
they cost a replica anything. It uses the engine's ``InputProcessor`` (built from the model
directory's config and tokenizer, never the weights), so a prompt sent over HTTP and the same
prompt given to ``LLM.generate`` / ``LLM.chat`` are the same token ids, refused for the same
reasons, and named by the same block hashes. This module only maps its ``InputError`` s to
HTTP errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmesh.replicas.block_hash import BlockHash
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.input_processor import InputError, InputProcessor
from kvmesh.replicas.structured import (
    GrammarError,
    StructuredOutputCompiler,
    StructuredOutputsParams,
)
from kvmesh.replicas.structured.grammar import DEFAULT_COMPILE_TIMEOUT_S
from kvmesh.replicas.tool_calls import ParserName, pick_parser
from kvmesh.router.errors import APIError

T = TypeVar("T")


@dataclass
class PromptInput:
    """One prompt as a replica receives it."""

    text: str | None
    token_ids: list[int]
    block_hashes: list[BlockHash]


def _api_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except InputError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None


@dataclass
class ModelInfo:
    name: str
    inputs: InputProcessor
    tool_parser: ParserName = "hermes"
    compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S
    _compiler: StructuredOutputCompiler | None = None

    @property
    def structured(self) -> StructuredOutputCompiler:
        """Compiles grammars to check them before a request is sent (the replica compiles
        its own; both caches are keyed by the spec)."""
        if self._compiler is None:
            tokenizer = self.tokenizer
            eos = getattr(tokenizer, "eos_token_id", None)
            self._compiler = StructuredOutputCompiler(
                tokenizer,
                self.inputs.vocab_size,
                [] if eos is None else [eos],
                compile_timeout_s=self.compile_timeout_s,
            )
        return self._compiler

    async def check_structured(self, spec: StructuredOutputsParams, field: str) -> None:
        """A 400 naming ``field`` for a schema, regex or grammar that does not compile."""
        try:
            await self.structured.compile_async(spec)
        except GrammarError as exc:
            raise APIError(400, f"{field}: {exc.message}", param=field) from None

    @property
    def tokenizer(self) -> Any | None:
        return self.inputs.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len

    @property
    def block_size(self) -> int:
        return self.inputs.hasher.block_size

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """A completion prompt as (text or None, token ids), checked."""

        def encode() -> tuple[str | None, list[int]]:
            text, ids = self.inputs.tokenize(prompt)
            self.inputs.check_prompt(ids)
            return text, ids

        return _api_errors(encode)

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[int]]:
        """The conversation through the model's chat template, with the assistant cue."""

        def encode() -> tuple[str, list[int]]:
            text, ids = self.inputs.encode_chat(messages, tools)
            self.inputs.check_prompt(ids)
            return text, ids

        return _api_errors(encode)

    def prompt_input(self, text: str | None, ids: list[int]) -> PromptInput:
        return PromptInput(text, ids, self.inputs.block_hashes(ids))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])


def load_model_info(name: str, engine_args: dict[str, Any]) -> ModelInfo:
    args = EngineArgs.model_validate({**engine_args, "served_model_name": name})
    inputs = InputProcessor.from_args(args)
    template = getattr(inputs.tokenizer, "chat_template", None)
    return ModelInfo(
        name=name,
        inputs=inputs,
        tool_parser=pick_parser(args.tool_call_parser, template),
        compile_timeout_s=args.structured_outputs_compile_timeout_s,
    )
