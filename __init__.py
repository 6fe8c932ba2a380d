"""kvmesh: an LLM serving cluster on Ray Serve.

This file is the public facade; the code lives in the subpackages (``kvmesh.replicas``,
``kvmesh.router``, ``kvmesh.kernels``, ``kvmesh.cluster``). Imports are lazy so that
``import kvmesh`` stays cheap for the CLI and for Ray workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "kvmesh.replicas.llm",
    "SamplingParams": "kvmesh.replicas.sampling_params",
    "EngineArgs": "kvmesh.replicas.engine_args",
    "LLMEngine": "kvmesh.replicas.llm_engine",
    "RequestOutput": "kvmesh.replicas.outputs",
    "CompletionOutput": "kvmesh.replicas.outputs",
    "AsyncLLM": "kvmesh.replicas.async_engine",
}

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]

if TYPE_CHECKING:
    from kvmesh.replicas.async_engine import AsyncLLM
    from kvmesh.replicas.engine_args import EngineArgs
    from kvmesh.replicas.llm import LLM
    from kvmesh.replicas.llm_engine import LLMEngine
    from kvmesh.replicas.outputs import CompletionOutput, RequestOutput
    from kvmesh.replicas.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
