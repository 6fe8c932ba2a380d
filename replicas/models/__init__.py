"""Model definitions and the registry of supported architectures."""

from __future__ import annotations

from kvmesh.replicas.model_arch import SUPPORTED_ARCHITECTURES, ModelArchConfig
from kvmesh.replicas.models.llama import LlamaForCausalLM

_REGISTRY = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelArchConfig) -> type[LlamaForCausalLM]:
    try:
        return _REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
