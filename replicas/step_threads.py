"""How many torch threads each engine step runs with, when a replica shares its cores.

On a small machine the engine shares the cores with Serve's own processes (proxy, ingress,
the replica's event loop), which do their work per streamed token. A config that keeps a
core for Serve can still lend it to the steps with real work: a step that computes at least
``burst_min_tokens`` tokens (a prefill chunk, a large decode batch) runs with ``burst``
threads, a light one with ``base``.

Opt-in (``torch_threads_burst``). ``kvmesh serve`` gives the engine every core for every step:
on a 2-core AMX machine that decoded faster at low concurrency than one thread for light
steps (see ``kvmesh.cluster.serve_cmd.engine_threads_per_replica``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_BURST_MIN_TOKENS = 8
"""A step computing this many tokens or more runs with the burst threads. Measured with
``bench/serve_vs_vllm.py`` on a 2-core machine (bfloat16 SmolLM2, 1 base and 2 burst threads):
at concurrency 16, 8 gave 122 output tokens/s and 32 gave 109, where fixed 1 and 2 threads
gave 85 and 111; at concurrency 1 (single-token decodes) both thresholds behave alike."""

BURST_THREADS_HELP = (
    "Threads for steps that compute at least burst_min_tokens tokens (a prefill, a large "
    "batch); lighter steps keep torch_threads. Null: always torch_threads."
)


@dataclass
class StepThreads:
    base: int
    burst: int
    burst_min_tokens: int = DEFAULT_BURST_MIN_TOKENS
    _current: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base < 1 or self.burst < 1:
            raise ValueError(f"thread counts must be >= 1, got base={self.base} burst={self.burst}")
        if self.burst_min_tokens < 1:
            raise ValueError(f"burst_min_tokens must be >= 1, got {self.burst_min_tokens}")

    def threads_for(self, num_tokens: int) -> int:
        return self.burst if num_tokens >= self.burst_min_tokens else self.base

    def apply(self, num_tokens: int) -> int:
        """Set this thread's torch threads for a step computing ``num_tokens`` tokens (call on
        the thread that runs the model: OpenMP's thread count is per calling thread)."""
        threads = self.threads_for(num_tokens)
        if threads != self._current:
            torch.set_num_threads(threads)
            self._current = threads
        return threads
