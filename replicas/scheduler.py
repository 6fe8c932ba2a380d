"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step spends a token budget. Running requests go first (their decodes, or the next chunk
of a long prompt), in admission order; waiting requests are then admitted first-come,
first-served while the budget, ``max_num_seqs`` and the KV pool allow. When the pool runs dry,
the most recently admitted request is preempted by recompute: its blocks are freed and it goes
back to the front of the queue with its output so far, to be re-prefilled (often from the
prefix cache) and continue where it stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmesh.replicas.kv.manager import KVCacheManager
from kvmesh.replicas.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


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
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
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
            block_size = self.kv.block_size
            for req in self._unestimated.values():
                req.cached_estimate = len(self.kv.find_cached_prefix(req)) * block_size
                self._waiting_pending += max(req.num_prompt_tokens - req.cached_estimate, 0)
            self._unestimated.clear()
        return self._running_pending + self._waiting_pending

    def advance(self, req: Request, num_tokens: int) -> None:
        """``req`` computed ``num_tokens`` more tokens (its scheduled share of a step)."""
        before = self._left_to_compute(req)
        req.num_computed_tokens += num_tokens
        if req.status == RequestStatus.RUNNING:
            self._running_pending += self._left_to_compute(req) - before

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self._enter_waiting(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget if self.token_budget is not None else 1 << 62

        # 1. Running requests: decodes and continuing prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            num_new = min(num_new, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it can fit either

        # 2. Admit waiting requests, first come first served (none if we just preempted).
        if out.preempted:
            return out
        pending = self._blocks_in_flight()
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.find_cached_prefix(req)
            if (
                pending
                and len(deferred) < MAX_DEFERRED
                and self._next_block_pending(req, len(hits), pending)
            ):
                # Its next block is being computed right now for another request: wait one
                # step and hit it in the cache instead of computing it twice.
                deferred.append(self.waiting.popleft())
                continue
            num_hit = len(hits) * self.kv.block_size
            num_new = req.num_tokens - num_hit
            if num_new > budget:
                if not self.chunked:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hits):
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
            out.scheduled.append((req, num_new))
            budget -= num_new
            if pending is not None:
                pending.update(self._uncomputed_prompt_blocks(req))
        # Deferred requests keep their place at the head of the queue.
        self.waiting.extendleft(reversed(deferred))
        return out

    def _uncomputed_prompt_blocks(self, req: Request) -> list[bytes]:
        hashes = req.full_block_hashes(self.kv.block_size, self.kv.extra_keys)
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
        hashes = req.full_block_hashes(self.kv.block_size, self.kv.extra_keys)
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

    def finish(self, req: Request) -> None:
        """Retire ``req`` (finished or aborted) wherever it is, and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._running_pending -= self._left_to_compute(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
            self._leave_waiting(req)
        req.status = RequestStatus.FINISHED
        self.kv.free(req)
