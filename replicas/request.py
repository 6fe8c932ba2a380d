"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmesh.replicas.block_hash import BlockHash, hash_block_tokens
from kvmesh.replicas.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # prompt + generated tokens; the first num_computed_tokens have their KV in the cache.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    # Prompt tokens expected from the prefix cache while waiting (engine.stats' estimate).
    cached_estimate: int | None = None
    generator: torch.Generator | None = None
    # The sampler's incremental per-request statistics (penalties), kept across steps.
    sampler_state: Any = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def full_block_hashes(self, block_size: int, extra_keys: tuple) -> list[BlockHash]:
        """Hashes of every full block of the tokens so far, extended incrementally."""
        num_full = self.num_tokens // block_size
        if len(self.block_hashes) < num_full:
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.extend(
                hash_block_tokens(
                    self.token_ids[: num_full * block_size],
                    block_size,
                    extra_keys,
                    parent=parent,
                    start_block=len(self.block_hashes),
                )
            )
        return self.block_hashes
