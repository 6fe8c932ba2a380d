"""Continuous batching, and the one owner of a request's life from admission to finish.

``schedule`` decides which requests run in the next step, and how many tokens each. Every
step spends a token budget. Running requests go first (their decodes, or the next chunk of a
long prompt), in admission order; waiting requests are then admitted first-come,
first-served while the budget, ``max_num_seqs`` and the KV pool allow. With
``long_prefill_token_threshold`` one request computes at most that many prompt tokens per
step, so a long prompt's prefill leaves budget for requests that arrive behind it; and at most
``max_long_partial_prefills`` such long prompts are prefilled at once: a further long prompt
waits (short ones behind it go ahead), so two cold prompts do not share every step and both
finish late. When the
pool runs dry, the most recently admitted request is preempted by recompute: its blocks are
freed and it goes back to the front of the queue with its output so far, to be re-prefilled
(often from the prefix cache) and continue where it stopped.

``update_from_output`` takes the runner's result for that step and does everything the step
means for each request: advances its computed tokens, registers the blocks it filled,
appends its sampled token, decides end-of-sequence, stop-token and length stops, frees
finished requests' blocks and sliding-window blocks no future token sees. A fault in one
request's part of that fails that request alone. Stop strings are text, so the output
processor finds them; it hands those requests back through ``finish_requests``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kvmesh.replicas.kv.manager import KVCacheManager
from kvmesh.replicas.request import Request, RequestStatus
from kvmesh.replicas.step_types import (
    NewRequest,
    RequestUpdate,
    RunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
    StructuredMask,
)

FaultInjector = Callable[[str, object], None]
"""Test-only: ``injector(phase, request)`` may raise, to fail that request in that phase."""


MAX_DEFERRED = 64
"""At most this many waiting requests are held back per step for blocks in flight, so one
step never scans an unbounded queue."""


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int | None,
        enable_chunked_prefill: bool = True,
        *,
        eos_token_ids: Iterable[int] = (),
        max_model_len: int | None = None,
        allocate_bitmask: Callable[[int], Any] | None = None,
        long_prefill_token_threshold: int = 0,
        max_long_partial_prefills: int = 1,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        # One request's prompt tokens per step (0: only the budget caps them). Without a cap a
        # long prompt's chunk takes the whole budget and requests arriving behind it wait for
        # all of its prefill before their first step.
        self.prefill_cap = long_prefill_token_threshold if enable_chunked_prefill else 0
        # With a cap, how many prompts needing more than one capped chunk prefill at once.
        # Sharing steps between two long prompts makes both finish late (p99 TTFT rises); one
        # at a time keeps first-come-first-served among them, and the cap still lets short
        # prompts through between chunks.
        self.max_long_partial_prefills = max_long_partial_prefills
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        # Structured output: an empty (all-allowed) token bitmask of n rows.
        self.allocate_bitmask = allocate_bitmask
        self.requests: dict[str, Request] = {}  # waiting and running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_generated_tokens = 0
        self.fault_injector: FaultInjector | None = None
        self._finished_ids: list[str] = []  # since the last step, for the runner
        # Prompt tokens admitted but not computed yet, kept as requests move (never a walk
        # over every request): running requests count what is left of their prompt, waiting
        # ones their prompt minus the prefix-cache estimate, looked up once per wait, lazily.
        self._running_pending = 0
        self._waiting_pending = 0
        self._unestimated: dict[int, Request] = {}  # waiting, estimate not looked up yet

    @staticmethod
    def _left_to_compute(req: Request) -> int:
        return max(req.num_prompt_tokens - req.num_computed_tokens, 0)

    def _enter_waiting(self, req: Request) -> None:
        req.cached_estimate = None
        self._unestimated[id(req)] = req

    def _leave_waiting(self, req: Request) -> None:
        if self._unestimated.pop(id(req), None) is None and req.cached_estimate is not None:
            self._waiting_pending -= max(req.num_prompt_tokens - req.cached_estimate, 0)

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens admitted but not computed yet (see ``LLMEngine.pending_prefill_tokens``);
        O(requests that arrived or were preempted since the last call)."""
        if self._unestimated:
            for req in self._unestimated.values():
                req.cached_estimate = self.kv.find_cached_prefix(req).num_tokens
                self._waiting_pending += max(req.num_prompt_tokens - req.cached_estimate, 0)
            self._unestimated.clear()
        return self._running_pending + self._waiting_pending

    def _advance(self, req: Request, num_tokens: int) -> None:
        """``req`` computed ``num_tokens`` more tokens (its scheduled share of a step)."""
        before = self._left_to_compute(req)
        req.num_computed_tokens += num_tokens
        if req.status == RequestStatus.RUNNING:
            self._running_pending += self._left_to_compute(req) - before

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self._enter_waiting(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step: which requests compute how many tokens (see the module docstring)."""
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        budget = self.token_budget if self.token_budget is not None else 1 << 62

        # Long prompts still prefilling after this step (they hold back other long ones).
        num_long = self._num_long_prefills()

        # 1. Running requests: decodes and continuing prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._capped(req.num_tokens - req.num_computed_tokens)
            num_new = min(num_new, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it can fit either

        # 2. Admit waiting requests, first come first served (none if we just preempted).
        if not preempted:
            self._admit(scheduled, budget, num_long)
        return self._output(scheduled, preempted)

    def _capped(self, num_new: int) -> int:
        cap = self.prefill_cap
        return cap if 0 < cap < num_new else num_new

    def _num_long_prefills(self) -> int:
        """Running requests with more prompt left than one capped chunk (0 without a cap)."""
        cap = self.prefill_cap
        if cap <= 0:
            return 0
        return sum(1 for r in self.running if self._left_to_compute(r) > cap)

    def _admit(self, scheduled: list[tuple[Request, int]], budget: int, num_long: int) -> None:
        pending = self._blocks_in_flight()
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            prefix = self.kv.find_cached_prefix(req)
            if (
                pending
                and len(deferred) < MAX_DEFERRED
                and self._next_block_pending(req, prefix.num_blocks, pending)
            ):
                # Its next block is being computed right now for another request: wait one
                # step and hit it in the cache instead of computing it twice.
                deferred.append(self.waiting.popleft())
                continue
            num_hit = prefix.num_tokens
            num_new = self._capped(req.num_tokens - num_hit)
            is_long = num_new < req.num_tokens - num_hit
            if is_long and num_long >= self.max_long_partial_prefills:
                if len(deferred) >= MAX_DEFERRED:
                    break
                # Another long prompt is prefilling: this one waits its turn, and shorter
                # requests behind it go ahead.
                deferred.append(self.waiting.popleft())
                continue
            if num_new > budget:
                if not self.chunked:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, prefix):
                break
            self.waiting.popleft()
            self._leave_waiting(req)
            self.kv.record_query(req, num_hit)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = min(num_hit, req.num_prompt_tokens)
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._running_pending += self._left_to_compute(req)
            scheduled.append((req, num_new))
            budget -= num_new
            num_long += is_long
            if pending is not None:
                pending.update(self._uncomputed_prompt_blocks(req))
        # Deferred requests keep their place at the head of the queue.
        self.waiting.extendleft(reversed(deferred))

    def _output(
        self, scheduled: list[tuple[Request, int]], preempted: list[Request]
    ) -> SchedulerOutput:
        """The step as plain data for the runner (which is only called for a step that
        computes something: the finished ids wait for one)."""
        out = SchedulerOutput(preempted_request_ids=[r.request_id for r in preempted])
        if scheduled:
            out.finished_request_ids, self._finished_ids = self._finished_ids, []
        constrained: list[tuple[int, Request]] = []  # (sampling row, request)
        num_sampling = 0
        for req, n in scheduled:
            start = req.num_computed_tokens
            sample = start + n == req.num_tokens
            if sample:
                if req.grammar is not None:
                    constrained.append((num_sampling, req))
                num_sampling += 1
            if not req.announced:
                req.announced = True
                out.new_requests.append(
                    NewRequest(req.request_id, req.prompt_token_ids, req.params, req.seed)
                )
            out.chunks.append(
                ScheduledChunk(
                    request_id=req.request_id,
                    token_ids=req.token_ids[start : start + n],
                    start=start,
                    block_ids=self.kv.block_ids(req),
                    sample=sample,
                )
            )
        if constrained:
            out.structured = self._token_masks(num_sampling, constrained)
        return out

    def _token_masks(
        self, num_sampling: int, constrained: list[tuple[int, Request]]
    ) -> StructuredMask:
        """Each constrained row's allowed next tokens. A fault filling one request's row is
        kept on that request (its update fails it) and leaves the row all-allowed."""
        assert self.allocate_bitmask is not None, "a grammar request needs allocate_bitmask"
        bitmask = self.allocate_bitmask(num_sampling)
        rows = []
        for row, req in constrained:
            try:
                self._inject("grammar", req)
                req.grammar.fill_bitmask(bitmask, row)  # type: ignore[union-attr]
                rows.append(row)
            except Exception as exc:
                req.grammar_error = exc
        return StructuredMask(bitmask, rows)

    def _uncomputed_prompt_blocks(self, req: Request) -> list[bytes]:
        hashes = req.full_block_hashes(self.kv.hasher)
        return hashes[req.num_computed_tokens // self.kv.block_size :]

    def _blocks_in_flight(self) -> set[bytes] | None:
        """Hashes of prompt blocks that running requests have yet to finish computing."""
        if not self.kv.enable_prefix_caching:
            return None
        pending: set[bytes] = set()
        for req in self.running:
            if req.num_computed_tokens < req.num_prompt_tokens:
                pending.update(self._uncomputed_prompt_blocks(req))
        return pending

    def _next_block_pending(self, req: Request, num_hits: int, pending: set[bytes]) -> bool:
        hashes = req.full_block_hashes(self.kv.hasher)
        usable = (req.num_tokens - 1) // self.kv.block_size
        return num_hits < usable and hashes[num_hits] in pending

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._running_pending -= self._left_to_compute(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._enter_waiting(req)

    # ---- the update: one step's result, applied to every request it touched --------------
    def update_from_output(
        self, sched: SchedulerOutput, result: RunnerOutput
    ) -> list[RequestUpdate]:
        """Apply one step's result; return an update for each request that sampled or ended.

        Per request, in this order: its computed tokens advance and the blocks it filled are
        registered; its sampled token is appended and the stop rules applied (a finished
        request's blocks go back to the pool); blocks that slid out of its window are freed.
        A fault in any of that is this request's alone: it ends with ``finish_reason``
        "error", its blocks freed, and the batch carries on.
        """
        updates: list[RequestUpdate] = []
        touched: list[Request] = []
        for chunk in sched.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None:  # ended since it was scheduled
                continue
            touched.append(req)
            self._advance(req, chunk.num_tokens)
            try:
                self._inject("cache_blocks", req)
                self.kv.cache_full_blocks(req)
            except Exception as exc:
                updates.append(self._fail(req, "cache_blocks", exc))
        for request_id, token_result in result.sampled.items():
            req = self.requests.get(request_id)
            if req is None:  # failed above
                continue
            try:
                self._inject("sample", req)
                if isinstance(token_result, Exception):
                    raise token_result
                updates.append(self._append_token(req, *token_result))
            except Exception as exc:
                updates.append(self._fail(req, "sample", exc))
        for req in touched:
            if not req.finished:
                try:
                    self.kv.free_outside_window(req)
                except Exception as exc:
                    updates.append(self._fail(req, "free_window", exc))
        return updates

    def _append_token(
        self, req: Request, token: int, logprobs: dict[int, float] | None
    ) -> RequestUpdate:
        if req.grammar is not None:
            if req.grammar_error is not None:
                raise req.grammar_error
            if not req.grammar.accept(token):
                raise ValueError(f"token {token} does not follow the request's grammar")
        req.token_ids.append(token)
        self.num_generated_tokens += 1
        p = req.params
        if req.grammar is not None and req.grammar.terminated:
            # The grammar is complete (its stop token accepted): nothing more may follow,
            # whatever ignore_eos says.
            req.finish_reason = "stop"
        elif (
            not p.ignore_eos
            and token in self.eos_token_ids
            and req.num_output_tokens > p.min_tokens - 1
        ):
            req.finish_reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif req.num_output_tokens >= req.max_tokens or (
            self.max_model_len is not None and req.num_tokens >= self.max_model_len
        ):
            req.finish_reason = "length"
        update = RequestUpdate(
            request_id=req.request_id,
            new_token_ids=[token],
            new_logprobs=logprobs,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )
        if req.finish_reason is not None:
            self._retire(req)
        return update

    def _fail(self, req: Request, phase: str, exc: BaseException) -> RequestUpdate:
        req.finish_reason = "error"
        if not req.finished:
            self._retire(req)
        return RequestUpdate(
            request_id=req.request_id,
            finish_reason="error",
            num_cached_tokens=max(req.num_cached_tokens, 0),
            error=exc,
            phase=phase,
        )

    def _inject(self, phase: str, req: Request) -> None:
        if self.fault_injector is not None:
            self.fault_injector(phase, req)

    def finish_requests(
        self, request_ids: Iterable[str], reason: str, stop_reason: str | int | None = None
    ) -> list[str]:
        """End these requests (aborted, stopped by a stop string, failed after the update)
        wherever they are, and free their blocks; returns the ids that were still live."""
        ended = []
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None:
                continue
            req.finish_reason, req.stop_reason = reason, stop_reason
            self._retire(req)
            ended.append(request_id)
        return ended

    def _retire(self, req: Request) -> None:
        """Take ``req`` out wherever it is, free its blocks, tell the runner next step."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._running_pending -= self._left_to_compute(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
            self._leave_waiting(req)
        req.status = RequestStatus.FINISHED
        self.requests.pop(req.request_id, None)
        if req.announced:
            self._finished_ids.append(req.request_id)
        self.kv.free(req)
