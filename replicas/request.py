"""One request's scheduling state, owned by the scheduler from admission to finish.

What the other stages keep of a request lives with them, keyed by its id: the runner its
sampling state (``sampler.SamplingRow``), the output processor its text and timings
(``output_processor.RequestState``). None of them holds a ``Request``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmesh.replicas.block_hash import BlockHash, BlockHasher
from kvmesh.replicas.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvmesh.replicas.structured.grammar import GrammarMatcher


class TokenSequence:
    """A prompt and the tokens generated after it (``token_ids`` holds both), for the
    dataclasses that keep one: ``Request`` and the sampler's ``SamplingRow``."""

    prompt_token_ids: list[int]
    token_ids: list[int]

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
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request(TokenSequence):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int | None = None
    """The random stream's seed (None: greedy, draws nothing)."""
    status: RequestStatus = RequestStatus.WAITING
    # prompt + generated tokens; the first num_computed_tokens have their KV in the cache.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    # Prompt tokens expected from the prefix cache while waiting (engine.stats' estimate).
    cached_estimate: int | None = None
    announced: bool = False
    """The runner has been sent this request's ``NewRequest`` (it keeps its sampling state)."""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    grammar: GrammarMatcher | None = None
    """Structured output: where the output is in its grammar (None: unconstrained)."""
    grammar_error: Exception | None = None
    """A fault filling this request's token mask: it fails the request in the update."""

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def full_block_hashes(self, hasher: BlockHasher) -> list[BlockHash]:
        """Hashes of every full block of the tokens so far, extended incrementally."""
        num_full = self.num_tokens // hasher.block_size
        if len(self.block_hashes) < num_full:
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.extend(
                hasher.hash_blocks(
                    self.token_ids[: num_full * hasher.block_size],
                    parent=parent,
                    start_block=len(self.block_hashes),
                )
            )
        return self.block_hashes
