"""What the ingress knows about each served model: tokenizer, chat template, limits, hashing.

The ingress tokenises so that requests reach replicas as token ids with their prefix-block
hashes (what a prefix-aware router matches on) and so that over-long prompts are refused before
they cost a replica anything. It reads the model directory's config and tokenizer only, never
the weights. Text is encoded exactly as the engine encodes it offline, so a prompt sent over
HTTP and the same prompt given to ``LLM.generate`` / ``LLM.chat`` are the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmesh.replicas.block_hash import BlockHash, hash_block_tokens
from kvmesh.replicas.chat import ChatTemplateError, encode_chat
from kvmesh.replicas.config import EngineArgs, ModelArchConfig
from kvmesh.replicas.engine import load_tokenizer
from kvmesh.replicas.model_files import resolve_model_dir
from kvmesh.router.errors import APIError


@dataclass
class PromptInput:
    """One prompt as a replica receives it."""

    text: str | None
    token_ids: list[int]
    block_hashes: list[BlockHash]


@dataclass
class ModelInfo:
    name: str
    tokenizer: Any | None
    max_model_len: int
    vocab_size: int
    block_size: int

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """A completion prompt as (text or None, token ids); 400 on bad ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(
                    400,
                    f"model {self.name} has no tokenizer: send the prompt as token ids",
                    param="prompt",
                )
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"prompt: token id {bad} is outside [0, {self.vocab_size})",
                    param="prompt",
                    code="invalid_value",
                )
        self.check_length(ids)
        return text, ids

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The conversation through the model's chat template, with the assistant cue."""
        try:
            text, ids = encode_chat(self.tokenizer, messages)
        except ChatTemplateError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        self.check_length(ids)
        return text, ids

    def check_length(self, ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if len(ids) >= self.max_model_len:
            raise APIError(
                413,
                f"prompt is {len(ids)} tokens; this model's context is {self.max_model_len} "
                f"tokens, so prompts may have at most {self.max_model_len - 1}",
                param="prompt",
                code="context_length_exceeded",
            )

    def prompt_input(self, text: str | None, ids: list[int]) -> PromptInput:
        return PromptInput(text, ids, self.block_hashes(ids))

    def block_hashes(self, ids: list[int]) -> list[BlockHash]:
        return hash_block_tokens(ids, self.block_size, extra_keys=(self.name,))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])


def load_model_info(name: str, engine_args: dict[str, Any]) -> ModelInfo:
    args = EngineArgs.model_validate(engine_args)
    model_dir = resolve_model_dir(args.model)
    arch = ModelArchConfig.from_dir(model_dir)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else model_dir)
    return ModelInfo(
        name=name,
        tokenizer=tokenizer,
        max_model_len=args.max_model_len or arch.max_position_embeddings,
        vocab_size=arch.vocab_size,
        block_size=args.block_size,
    )
