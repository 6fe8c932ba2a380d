"""Output processing, once: the scheduler's per-request updates become ``RequestOutput`` s.

Per request it keeps what the caller sees (``RequestState``): the incremental detokenizer,
the output token ids and logprobs, and the timings. Per update it detokenises the new token,
looks for stop strings (text: only here can they be found), and builds the output: the
delta while the request runs, the whole generation once it has finished.

A stop string ends the request here; a fault in this request's own processing (phases
``detokenize`` and ``output``) fails it alone. Both come back in ``ProcessedOutputs`` so the
engine retires those requests in the scheduler too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmesh.replicas.detokenizer import Detokenizer
from kvmesh.replicas.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.step_types import RequestUpdate

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """One request as its caller sees it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: Detokenizer | None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    running_metrics: RequestMetrics | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)
    """Requests a stop string ended (id -> the stop string): the scheduler retires them."""
    failed: list[str] = field(default_factory=list)
    """Requests that failed in output processing: the scheduler retires them."""


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.num_failed_requests = 0
        self.fault_injector: Callable[[str, object], None] | None = None

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        """Start a request's state (may raise: call before the scheduler takes it)."""
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = Detokenizer(
                self.tokenizer.backend_tokenizer,
                prompt_token_ids,
                params.stop_strings,
                params.skip_special_tokens,
                params.include_stop_str_in_output,
            )
        self.states[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, detokenizer
        )

    def process(self, updates: list[RequestUpdate]) -> ProcessedOutputs:
        result = ProcessedOutputs()
        now = time.monotonic()
        for update in updates:
            state = self.states.get(update.request_id)
            if state is None:
                continue
            if update.error is not None:
                result.outputs.append(self._fail(state, update.phase or "update", update.error))
                continue
            phase = "detokenize"
            try:
                stop_str = self._add_tokens(state, update, now)
                finish_reason, stop_reason = update.finish_reason, update.stop_reason
                # A stop string outranks a length stop of the same token, as it always did;
                # end-of-sequence and stop tokens outrank it.
                if stop_str is not None and finish_reason in (None, "length"):
                    finish_reason, stop_reason = "stop", stop_str
                    if update.finish_reason is None:
                        result.stopped[state.request_id] = stop_str
                phase = "output"
                self._inject("output", state)
                result.outputs.append(self._output(state, update, finish_reason, stop_reason))
            except Exception as exc:
                result.stopped.pop(state.request_id, None)
                result.failed.append(state.request_id)
                result.outputs.append(self._fail(state, phase, exc))
        return result

    def abort(self, request_id: str) -> RequestOutput | None:
        """A request's final output after an abort (None if unknown)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        update = RequestUpdate(request_id, finish_reason="abort")
        return self._output(state, update, "abort", None)

    # ---- per request -------------------------------------------------------------------
    def _inject(self, phase: str, state: RequestState) -> None:
        if self.fault_injector is not None:
            self.fault_injector(phase, state)

    def _add_tokens(self, state: RequestState, update: RequestUpdate, now: float) -> str | None:
        """Record the update's tokens; returns the stop string they completed, if any."""
        stop_str = None
        for token in update.new_token_ids:
            state.output_token_ids.append(token)
            if state.first_token_time is None:
                state.first_token_time = now
            state.token_times.append(now)
            if update.new_logprobs is not None:
                state.logprobs.append(update.new_logprobs)
            if state.detokenizer is not None:
                self._inject("detokenize", state)
                stop_str = state.detokenizer.add_token(token) or stop_str
        state.num_cached_tokens = update.num_cached_tokens
        return stop_str

    def _output(
        self,
        state: RequestState,
        update: RequestUpdate,
        finish_reason: str | None,
        stop_reason: str | int | None,
    ) -> RequestOutput:
        """This step's output: the delta, and the whole generation once finished.

        Nothing here is proportional to the generation so far except the one-off copy of the
        finished output: a stream of n tokens costs O(n) in all, not O(n^2).
        """
        finished = finish_reason is not None
        detok = state.detokenizer
        delta = detok.delta(finished) if detok else ""
        new_tokens = update.new_token_ids
        delta_lps = [update.new_logprobs] if update.new_logprobs is not None else None
        if finished:
            self.states.pop(state.request_id, None)
            completion = CompletionOutput(
                index=0,
                text=detok.text if detok else "",
                token_ids=state.output_token_ids,
                finish_reason=finish_reason,
                stop_reason=stop_reason,
                logprobs=list(state.logprobs) if state.params.logprobs is not None else None,
            )
            metrics = RequestMetrics(
                arrival_time=state.arrival_time,
                first_token_time=state.first_token_time,
                finished_time=time.monotonic(),
                token_times=list(state.token_times),
            )
        else:
            completion = CompletionOutput(
                index=0, text=delta, token_ids=new_tokens, logprobs=delta_lps
            )
            # One metrics object serves every running output from the first token on (they
            # would all hold the same two times): read it, never change it.
            metrics = state.running_metrics
            if metrics is None or metrics.first_token_time != state.first_token_time:
                metrics = RequestMetrics(state.arrival_time, state.first_token_time)
                state.running_metrics = metrics
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=metrics,
            num_cached_tokens=state.num_cached_tokens,
            delta_text=delta,
            delta_token_ids=new_tokens,
            delta_logprobs=delta_lps,
            num_output_tokens=state.num_output_tokens,
        )

    def _fail(self, state: RequestState, phase: str, exc: BaseException) -> RequestOutput:
        """End ``state``'s request alone after a fault in its own processing.

        The client gets a short message with an id to find the details in the replica's log;
        the exception text itself stays in the log (it may hold internals).
        """
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "request %s failed in %s (error id %s)",
            state.request_id,
            phase,
            error_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self.num_failed_requests += 1
        self.states.pop(state.request_id, None)
        message = (
            f"the server failed while generating this request (error id {error_id}); "
            "other requests were not affected"
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[CompletionOutput(0, "", state.output_token_ids, finish_reason="error")],
            finished=True,
            metrics=RequestMetrics(state.arrival_time, state.first_token_time, time.monotonic()),
            error=message,
            num_output_tokens=state.num_output_tokens,
        )
