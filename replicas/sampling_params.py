"""Per-request sampling parameters, named as vLLM names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmesh.replicas.structured.params import StructuredOutputsParams

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy: dividing logits by them overflows float32."""


@dataclass(frozen=True)
class Bound:
    """An accepted range: ``ge``/``gt`` below, ``le``/``lt`` above (None: open)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        def num(v: float) -> str:
            return "2^63" if v == 2**63 else f"{v:g}"

        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if high is None:
            return f"at least {num(low)}" if self.ge is not None else f"above {num(low)}"
        left = "[" if self.ge is not None else "("
        right = "]" if self.le is not None else ")"
        return f"in {left}{num(low)}, {num(high)}{right}"  # type: ignore[arg-type]

    def field(self) -> dict[str, Any]:
        """As pydantic ``Field`` keyword arguments (the HTTP API's request schema)."""
        return {k: v for k, v in vars(self).items() if v is not None}


SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(ge=1),
    "temperature": Bound(ge=0.0, le=100.0),
    "top_p": Bound(gt=0.0, le=1.0),
    "top_k": Bound(ge=-1),  # and not 0: -1 disables it
    "min_p": Bound(ge=0.0, le=1.0),
    "presence_penalty": Bound(ge=-2.0, le=2.0),
    "frequency_penalty": Bound(ge=-2.0, le=2.0),
    "repetition_penalty": Bound(gt=0.0, le=2.0),
    "seed": Bound(ge=0, lt=2**63),
    "logprobs": Bound(ge=0, le=20),
    "min_tokens": Bound(ge=0),
}
"""Every numeric sampling parameter's accepted range: ``SamplingParams`` checks these, and
the HTTP API's request schema is built from them (``API_BOUNDS``)."""

API_BOUNDS: dict[str, Bound] = {**SAMPLING_BOUNDS, "temperature": Bound(ge=0.0, le=2.0)}
"""The same ranges, with the one the OpenAI API narrows: temperatures up to 2 over HTTP."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` means greedy. Every value is checked in ``__post_init__``: a bad value
    is a ``ValueError`` naming the field and its allowed range.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (a dict is taken as
    ``StructuredOutputsParams``' keyword arguments)."""
    # Filled in by the engine; not user-facing.
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not bound.contains(value):
                raise ValueError(f"{name} must be {bound.describe()}, got {value}")
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (disabled) or at least 1, got 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stop_list = stops
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
