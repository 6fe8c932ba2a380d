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
    long_prefill_token_threshold: int = Field(
        default=0,
        ge=0,
        description="Chunked prefill: at most this many prompt tokens of one request per step "
        "(0 = no cap beyond max_num_batched_tokens), so a long prompt leaves room in every "
        "step for newly arrived requests instead of making them wait for its whole prefill. "
        "Off by default: on the 2-replica CPU router runs 256 cut TTFT p90 by ~a quarter below "
        "saturation but raised it past saturation (bench/RESULTS.md, issue #15).",
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
