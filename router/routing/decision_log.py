"""Decision logs: what the prefix-aware router saw, chose and got, one record per request.

Off by default (``RouterConfig.decision_log``); when on, each routed request costs one small
record kept in a bounded in-memory ring and, with ``decision_log_path``, one JSON line in a
file, written when the request's outcome is known (or when it is evicted unanswered).

A record holds:

* ``t`` (wall clock), ``request_id`` (kvmesh's per prompt: ``x-kvmesh-request-id`` plus
  ``-<index of the prompt in the request>``),
  ``session_id``, ``num_prompt_tokens``, ``sticky`` (the session's previous replica, if any);
* ``candidates``: for every replica considered, the predicted cached tokens (and the tokens
  last routed there, ``home_tokens``) and each term of
  the cost (miss, queue, decode, KV) with the load figures behind them (and its reported
  prefill rate and the factor the prefill terms were priced at), and the total;
* ``best`` (ranked first), ``chosen`` (where Serve actually sent it: the second choice when
  the first was full), ``reason``;
* ``outcome``, filled in by the ingress from the stream: the replica that answered, the tokens
  it actually found cached, time to first token seen by the ingress and by the replica.

The log lives in the routing process (the ingress replica). The router and the ingress find
it by model name through :func:`get`; the ingress calls :func:`report_outcome`, which does
nothing unless a log is on for that model. ``kvmesh.router.routing.replay`` re-runs the policy
over a logged run with other settings.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.policy import Decision, Rivals, cost_terms, rate_factors


@dataclass
class CandidateTerms:
    replica: str
    hit_tokens: int
    queued_tokens: float
    resident: float
    kv_usage: float
    miss_cost: float
    queue_cost: float
    decode_cost: float
    kv_cost: float
    cost: float
    reported_hit_tokens: int | None = None
    """What the index matched before the eviction cut (``hit_tokens`` is after it)."""
    prefill_tokens_per_s: float | None = None
    """The replica's reported prefill rate (None: none reported)."""
    decode_step_s: float | None = None
    rate_factor: float = 1.0
    """What the prefill terms (``miss_cost``, ``queue_cost``) were multiplied by."""
    kv_blocks_total: int = 0
    """The replica's reported KV cache size (0: none reported); prices a copy's miss."""
    cached_blocks: int = 0
    """Blocks the router believed the replica cached (its cache fill prices a miss)."""
    home_tokens: int = 0
    """Leading prompt tokens last routed to the replica, cached there or not (prices a copy)."""


@dataclass
class DecisionRecord:
    t: float
    request_id: str
    session_id: str | None
    num_prompt_tokens: int
    sticky: str | None
    candidates: list[CandidateTerms]
    best: str
    reason: str
    chosen: str | None = None
    outcome: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecisionRecord:
        data = dict(data)
        data["candidates"] = [CandidateTerms(**c) for c in data["candidates"]]
        return cls(**data)


def candidate_terms(decision: Decision, num_prompt_tokens: int, config: RouterConfig):
    """Each candidate's cost split into its terms (the policy's formula, term by term)."""
    out = []
    factors = rate_factors(decision.candidates, config)
    rivals = Rivals.of(decision.candidates)
    for cand, factor in zip(decision.candidates, factors, strict=True):
        terms = cost_terms(num_prompt_tokens, cand, config, factor, rivals)
        out.append(
            CandidateTerms(
                replica=str(cand.replica),
                hit_tokens=cand.hit_tokens,
                queued_tokens=cand.load.queued_tokens,
                resident=cand.load.resident,
                kv_usage=cand.load.kv_usage,
                miss_cost=terms.miss,
                queue_cost=terms.queue,
                decode_cost=terms.decode,
                kv_cost=terms.kv,
                cost=terms.total,
                reported_hit_tokens=cand.reported_hit_tokens,
                prefill_tokens_per_s=cand.load.prefill_tokens_per_s,
                decode_step_s=cand.load.decode_step_s,
                rate_factor=factor,
                kv_blocks_total=cand.load.kv_blocks_total,
                cached_blocks=cand.cached_blocks,
                home_tokens=cand.home_tokens,
            )
        )
    return out


@dataclass
class DecisionLog:
    config: RouterConfig
    max_records: int = 10_000
    path: Path | None = None
    _open: OrderedDict[str, DecisionRecord] = field(default_factory=OrderedDict)
    _done: deque[DecisionRecord] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self,
        request_id: str,
        decision: Decision,
        num_prompt_tokens: int,
        session_id: str | None = None,
        sticky: Hashable | None = None,
    ) -> None:
        rec = DecisionRecord(
            t=time.time(),
            request_id=request_id,
            session_id=session_id,
            num_prompt_tokens=num_prompt_tokens,
            sticky=None if sticky is None else str(sticky),
            candidates=candidate_terms(decision, num_prompt_tokens, self.config),
            best=str(decision.best),
            reason=decision.reason.value,
        )
        evicted = None
        with self._lock:
            self._open[request_id] = rec
            if len(self._open) > self.max_records:
                evicted = self._open.popitem(last=False)[1]  # never answered: keep the record
        if evicted is not None:
            self._finish(evicted)

    def set_chosen(self, request_id: str, replica: Hashable) -> None:
        with self._lock:
            rec = self._open.get(request_id)
            if rec is not None:
                rec.chosen = str(replica)

    def complete(self, request_id: str, **outcome: Any) -> None:
        with self._lock:
            rec = self._open.pop(request_id, None)
        if rec is not None:
            rec.outcome = outcome
            self._finish(rec)

    def _finish(self, rec: DecisionRecord) -> None:
        with self._lock:
            self._done.append(rec)
            while len(self._done) > self.max_records:
                self._done.popleft()
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps(rec.as_json()) + "\n")

    def records(self) -> list[DecisionRecord]:
        """Finished records, oldest first (then those still waiting for an outcome)."""
        with self._lock:
            return [*self._done, *self._open.values()]

    def flush(self) -> None:
        """Write out the records still waiting for an outcome (at shutdown)."""
        with self._lock:
            pending = list(self._open.values())
            self._open.clear()
        for rec in pending:
            self._finish(rec)


_LOGS: dict[str, DecisionLog] = {}


def open_log(config: RouterConfig) -> DecisionLog | None:
    """The model's decision log in this process, made on first use; None when logging is off."""
    if not config.decision_log:
        return None
    log = _LOGS.get(config.model_name)
    if log is None:
        path = Path(config.decision_log_path) if config.decision_log_path else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        log = _LOGS[config.model_name] = DecisionLog(config, config.decision_log_max, path)
    return log


def get(model: str) -> DecisionLog | None:
    return _LOGS.get(model)


def report_outcome(model: str, request_id: str, **outcome: Any) -> None:
    """The ingress's side: what happened to a routed request (no-op when logging is off)."""
    log = _LOGS.get(model)
    if log is not None:
        log.complete(request_id, **outcome)


def read(path: str | Path) -> list[DecisionRecord]:
    with Path(path).open() as f:
        return [DecisionRecord.from_json(json.loads(line)) for line in f if line.strip()]
