"""What crosses the seams of one engine step, as plain data.

``LLMEngine.step`` is schedule → execute → update → outputs:

- the scheduler's ``SchedulerOutput`` tells the runner what to compute: per request a
  ``ScheduledChunk`` (token ids, first position, block table, whether to sample), the
  requests it sees for the first time (``NewRequest``: what sampling needs for their whole
  life) and the ones it may forget;
- the runner's ``RunnerOutput`` is each sampling row's token (or the exception that row
  raised);
- the scheduler's update turns that into one ``RequestUpdate`` per touched request (new
  token, finish reason, or the fault that ended it), which the output processor turns into
  ``RequestOutput`` s.

None of these holds a live ``Request``: each stage keeps its own state, keyed by request id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmesh.replicas.sampling_params import SamplingParams

TokenResult = tuple[int, dict[int, float] | None] | Exception
"""A sampled token and its logprobs (None unless asked for), or the row's own fault."""


@dataclass(frozen=True)
class NewRequest:
    """A request the runner has not seen: what sampling needs for its whole life."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    """The request's random stream (None: greedy, draws nothing)."""


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's share of a step: compute the KV of ``token_ids`` at positions
    ``start, start + 1, ...``, whose slots are in the blocks ``block_ids``."""

    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool
    """This chunk ends at the request's last token: sample the next one."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StructuredMask:
    """The allowed next tokens of the step's constrained rows (structured output).

    ``bitmask`` (int32) has one row per sampling row of the step, in the order of the
    step's sampling chunks; ``rows`` lists the constrained ones (the others are not read)."""

    bitmask: Any
    rows: list[int]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests that ended since the previous step: the runner drops their state."""
    preempted_request_ids: list[str] = field(default_factory=list)
    structured: StructuredMask | None = None
    """Set when a sampling row follows a grammar: mask its logits before sampling."""

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if c.num_tokens > 1)

    @property
    def num_decodes(self) -> int:
        return sum(1 for c in self.chunks if c.num_tokens == 1)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class RunnerOutput:
    sampled: dict[str, TokenResult] = field(default_factory=dict)
    """Per sampling request, in the step's order."""


@dataclass
class RequestUpdate:
    """The scheduler's word on one request after a step (or an abort)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    error: BaseException | None = None
    """The fault that ended the request in its own processing (``finish_reason`` "error")."""
    phase: str | None = None
    """Where that fault happened (a fault-injection phase name)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
