"""Input processing, once: prompt → token ids (chat template included) → a checked request.

The engine (``LLM``, ``AsyncLLM``) and the HTTP ingress both use an ``InputProcessor``, so a
prompt sent over HTTP and the same prompt given to ``LLM.generate`` / ``LLM.chat`` become the
same token ids, are refused for the same reasons with the same messages, get the same
default ``max_tokens`` and are named by the same block hashes. The ingress builds its own
from the engine arguments (``from_args``: config and tokenizer, never the weights), without
the KV-cache size, which only the engine knows; the engine checks that last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmesh.replicas.block_hash import BlockHash, BlockHasher
from kvmesh.replicas.chat import ChatTemplateError, encode_chat
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.model_files import resolve_model_dir
from kvmesh.replicas.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class InputError(ValueError):
    """Bad input, refused before it costs anything. ``param`` names the field, ``code`` is
    the OpenAI-style code, ``status`` the HTTP status the ingress answers with (413 for a
    prompt the context cannot hold, 400 otherwise)."""

    def __init__(
        self, message: str, *, param: str = "prompt", code: str = "invalid_value", status=400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(frozen=True)
class ProcessedInput:
    """A request's checked input: what the engine queues."""

    prompt: str | None
    token_ids: list[int]
    max_tokens: int
    """Effective: the caller's ``max_tokens`` capped by the context, or as many as fit."""


def load_tokenizer(path: Path):
    """The model's tokenizer, or None when the directory has none (prompts as token ids)."""
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def served_model_name(args: EngineArgs) -> str:
    return args.served_model_name or (args.model or DEFAULT_MODEL_NAME)


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any | None,
        vocab_size: int,
        max_model_len: int,
        hasher: BlockHasher,
        kv_capacity_tokens: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.hasher = hasher
        self.kv_capacity_tokens = kv_capacity_tokens

    @classmethod
    def from_args(cls, args: EngineArgs) -> InputProcessor:
        """From the model directory's config and tokenizer only (no weights, no KV cache)."""
        model_dir = resolve_model_dir(args.model)
        arch = ModelArchConfig.from_dir(model_dir)
        tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else model_dir)
        return cls(
            tokenizer,
            arch.vocab_size,
            args.max_model_len or arch.max_position_embeddings,
            BlockHasher.for_model(served_model_name(args), args.block_size),
        )

    # ---- prompt → token ids ---------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a string, a token-id list, or a vLLM-style dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InputError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(
                    "this model has no tokenizer: send the prompt as token ids "
                    "({'prompt_token_ids': [...]} offline)"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise InputError(f"prompt must be a string, a list of token ids or a dict, got {prompt!r}")

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[int]]:
        """The conversation (and the tools offered) through the model's chat template,
        with the assistant cue."""
        try:
            return encode_chat(self.tokenizer, messages, tools)
        except ChatTemplateError as exc:
            raise InputError(f"messages: {exc}", param="messages") from None

    # ---- checks ---------------------------------------------------------------------------
    def check_prompt(self, token_ids: list[int]) -> None:
        """Not empty, every id in the vocabulary, shorter than the context."""
        if not token_ids:
            raise InputError("prompt must not be empty")
        vocab = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"prompt: token id {bad} is outside [0, {vocab})")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise InputError(
                f"prompt is {n} tokens; the model's context (max_model_len) is "
                f"{self.max_model_len}, so prompts may have at most {self.max_model_len - 1}",
                code="context_length_exceeded",
                status=413,
            )

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check a request; return its effective max_tokens (the caller's, capped by the
        context; without one, as many as the context and the KV cache hold)."""
        self.check_prompt(token_ids)
        n = len(token_ids)
        room = self.max_model_len - n
        capacity = self.kv_capacity_tokens
        if params.max_tokens is not None:
            max_tokens = min(room, params.max_tokens)
        else:  # as many as fit (at least one, so a prompt that fills the cache is refused)
            max_tokens = max(room if capacity is None else min(room, capacity - n), 1)
        if capacity is not None and n + max_tokens > capacity:
            raise InputError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the whole KV cache "
                f"({capacity} tokens): lower max_tokens or raise num_kv_blocks / "
                f"kv_cache_memory_bytes",
                param="max_tokens",
            )
        if params.stop_token_ids and any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InputError(f"stop_token_ids must be in [0, {self.vocab_size})", param="stop")
        return max_tokens

    def process(
        self,
        prompt: Prompt | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> ProcessedInput:
        """Tokenise (unless ``prompt_token_ids`` are given) and validate."""
        if prompt_token_ids is None:
            text, token_ids = self.tokenize(prompt)  # type: ignore[arg-type]
        else:
            text = prompt if isinstance(prompt, str) else None
            token_ids = list(prompt_token_ids)
        return ProcessedInput(text, token_ids, self.validate(token_ids, params))

    def block_hashes(self, token_ids: list[int]) -> list[BlockHash]:
        """The prompt's prefix-block names, as the engine's KV cache names them."""
        return self.hasher.hash_blocks(token_ids)
