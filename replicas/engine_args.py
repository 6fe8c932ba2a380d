"""Engine arguments: what a user sets, named as vLLM names them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineArgs(BaseModel):
    """Engine arguments, named as vLLM names them. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        default=None,
        description="Local Hugging Face model directory or GGUF file; None = embedded SmolLM2.",
    )
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_size: int = Field(default=16, ge=1, le=256)
    max_num_seqs: int = Field(default=128, ge=1)
    max_num_batched_tokens: int | None = Field(
        default=2048, ge=1, description="Per-step token budget; None = unlimited."
    )
    long_prefill_token_threshold: int | None = Field(
        default=None,
        ge=0,
        description="Chunked prefill: at most this many prompt tokens of one request per step "
        "(0 = no cap beyond max_num_batched_tokens), so a long prompt leaves room in every "
        "step for newly arrived requests instead of making them wait for its whole prefill. "
        "None: 0 for offline use (throughput), and for a server on CPU "
        "SERVING_CPU_LONG_PREFILL_TOKENS (a full 2048-token CPU step takes seconds, and a "
        "short request arriving behind a cold prompt would wait all of them).",
    )
    max_long_partial_prefills: int = Field(
        default=1,
        ge=1,
        description="With long_prefill_token_threshold: how many prompts longer than it are "
        "prefilled at once. A further long prompt waits its turn while shorter requests behind "
        "it go ahead; sharing every step between long prompts would make them all finish late.",
    )
    max_model_len: int | None = Field(default=None, ge=1)
    num_kv_blocks: int | None = Field(default=None, ge=1)
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    kv_cache_dtype: Literal["auto", "fp8", "int8"] = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = Field(default=1, ge=1)
    seed: int = 0
    warmup: bool = Field(
        default=True,
        description="Serving: warm the engine up (kernels, a short prefill and decode) before "
        "the replica reports ready, so its first request runs at steady-state speed.",
    )
    structured_outputs_compile_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Structured output: a schema, regex or grammar that takes longer than this "
        "to compile is refused (400) instead of holding its request.",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        default="auto",
        description="How tool calls are found in a model's output with tool_choice=auto: "
        "hermes (<tool_call> JSON: Qwen, Hermes, and models whose template knows no tools), "
        "llama3_json (Llama 3.x), or auto (from the chat template).",
    )


SERVING_CPU_LONG_PREFILL_TOKENS = 256
"""A served CPU replica's default ``long_prefill_token_threshold``. On the 2-core CPU the
real router runs use (float32, one thread per replica) 256 prompt tokens take ~0.8 s, a full
512-token step ~1.7 s and a 2,048-token one ~6 s; with the cap (and one long prompt at a time)
a cached short turn arriving behind a cold 1-3k-token prompt waits one capped chunk instead of
the whole prefill (issue #15: TTFT p90 5.1 -> 4.2 s at 0.1 sessions/s, 8 tenants, p99 level).
Offline use keeps no cap: there throughput, not waiting, is what counts."""


def serving_defaults(args: EngineArgs, device_type: str) -> EngineArgs:
    """The arguments a server's engine runs with: latency knobs left unset (None) get their
    serving value on ``device_type`` ("cpu" or "cuda")."""
    if args.long_prefill_token_threshold is None and device_type == "cpu":
        return args.model_copy(
            update={"long_prefill_token_threshold": SERVING_CPU_LONG_PREFILL_TOKENS}
        )
    return args
