"""The model's architecture, read from its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelArchConfig(BaseModel):
    """The subset of a Hugging Face ``config.json`` our model code needs."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sliding_window: int | None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelArchConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else f"<none: model_type={raw.get('model_type')!r}>"
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise ValueError(f"unsupported architecture {arch!r}; supported: {supported}")
        heads = raw["num_attention_heads"]
        # transformers 5 keeps theta and scaling together in `rope_parameters`; older configs
        # have `rope_theta` and `rope_scaling` at top level.
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_scaling = dict(raw.get("rope_scaling") or {}) or None
        theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params:
            kind = rope_params.get("rope_type", rope_params.get("type", "default"))
            if kind != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = {**rope_scaling, "rope_type": kind}
            if kind == "default":
                rope_scaling = None
        sliding = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", arch == "Qwen2ForCausalLM"),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArchConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no config.json: pass a Hugging Face model directory")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]
