"""What the engine returns for each request, named as vLLM names it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """One request's output after a step: what is new since its previous output (the
    ``delta_*`` fields, always), and the whole generation once it has finished.

    While a request runs, ``outputs[0]`` holds only this step's delta as well (its ``text``,
    ``token_ids`` and ``logprobs`` are ``delta_text``, ``delta_token_ids`` and
    ``delta_logprobs``), so producing a step's output never copies the generation so far; a
    streaming consumer appends the deltas. The finished output's ``outputs[0]`` is the whole
    generation (built once, at the end), as ``LLM.generate`` returns it.
    ``num_output_tokens`` counts the tokens generated so far in either case.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    num_output_tokens: int = 0
