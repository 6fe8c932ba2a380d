"""The engine behind an asyncio API, for the serving layer.

The engine steps in its own thread (torch releases the GIL inside kernels, so the event loop
stays responsive while a step runs). Callers ``async for`` over a request's outputs; leaving
the loop early (client disconnect, cancellation) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvmesh.replicas.cpu_wait import CpuWaitMeter
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.llm_engine import LLMEngine, Prompt
from kvmesh.replicas.outputs import RequestOutput
from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.step_threads import StepThreads
from kvmesh.replicas.warmup import warm_up

log = logging.getLogger(__name__)

ENGINE_DEAD_MESSAGE = "the replica's engine failed and is being replaced; retry"
"""What callers see; the cause is in the replica's log (it may hold internals)."""
MIN_RATE_SAMPLE_TOKENS = 32
"""Steps with fewer prompt tokens than this say little about the prefill rate."""


def build_engine(args: EngineArgs) -> LLMEngine:
    """One process for ``tensor_parallel_size == 1``; Ray workers (``TPEngine``) above that."""
    if args.tensor_parallel_size > 1:
        from kvmesh.replicas.tp.tp_engine import TPEngine

        return TPEngine(args)
    return LLMEngine(args)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; the replica must be replaced."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued; retry later (HTTP 429/503)."""


class RequestFailedError(RuntimeError):
    """The engine failed while processing this one request; the others carry on.

    The message is safe to show a client (an error id, no internals); the log has the rest.
    """


DEFAULT_WATCHDOG_S = 120.0
"""With requests in flight, no engine step finishing for this long means the engine is stuck.
Longer than any legitimate step: a full prefill chunk of a large model on a CPU core."""


def _ewma(old: float | None, new: float, weight: float = 0.2) -> float:
    """Exponentially weighted average: recent steps count most, one odd step little."""
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class _Add:
    request_id: str
    token_ids: list[int]
    prompt: str | None
    params: SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    def __init__(
        self,
        args: EngineArgs | None = None,
        max_pending_requests: int | None = None,
        engine: LLMEngine | None = None,
        max_queue_delay_s: float | None = None,
        max_inter_token_latency_s: float | None = None,
        watchdog_s: float | None = DEFAULT_WATCHDOG_S,
        step_threads: StepThreads | None = None,
        **kwargs: Any,
    ) -> None:
        """``step_threads``: size each step's torch threads by its work (see
        ``kvmesh.replicas.step_threads``); None leaves the thread count alone."""
        self.max_pending_requests = max_pending_requests
        self.max_queue_delay_s = max_queue_delay_s
        self.max_inter_token_latency_s = max_inter_token_latency_s
        self.watchdog_s = watchdog_s
        # Prompt tokens the engine computes per second (EWMA over steps with real prefill
        # work): turns queued prefill tokens into an expected wait for admission control.
        self._prefill_rate: float | None = None
        self._prefill_tokens_total = 0
        # Seconds per step that decodes, and how many sequences it decoded (EWMAs): every
        # running request's inter-token latency, and the batch that latency was measured at.
        self._decode_step_s: float | None = None
        self._decode_batch: float | None = None
        self._last_progress = time.monotonic()
        # Seconds spent in steps, and the engine thread's wait for a core (from its first
        # step; see ``cpu_wait``): their ratio says whether the node starves the engine.
        self._step_seconds_total = 0.0
        self._cpu_wait: CpuWaitMeter | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._error: BaseException | None = None
        self._ids = itertools.count()
        started: queue.SimpleQueue = queue.SimpleQueue()  # None, or what start-up raised

        def start_then_run() -> None:
            # The engine is built, warmed and run on one thread. torch's OpenMP thread team
            # belongs to the thread that runs a parallel region: a model loaded on the
            # constructor's thread leaves a second, idle team behind, and libgomp, seeing
            # more of its threads than cores, then stops spinning at barriers and puts its
            # workers to sleep after every op (measured offline, bfloat16, 2 cores: 24.7 s
            # against 19.5 s with all on one thread). The first request must not pay for a
            # kernel build or any first-call cost either, so the warm-up runs here before
            # the constructor returns (the replica reports ready).
            try:
                if self.engine is None:
                    self.engine = build_engine(args or EngineArgs(**kwargs))
                if step_threads is not None:
                    self.engine.step_threads = step_threads
                self._stats = self.engine.stats()
                if self.engine.args.warmup:
                    warm_up(self.engine)
            except BaseException as exc:
                started.put(exc)
                return
            started.put(None)
            self._run()

        self.engine: LLMEngine = engine  # None until start_then_run builds it
        self._stats: dict[str, Any] = {}
        self._thread = threading.Thread(target=start_then_run, name="kvmesh-engine", daemon=True)
        self._thread.start()
        error = started.get()
        if error is not None:
            raise error

    # ---- public API ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def args(self) -> EngineArgs:
        """The engine's arguments (read-only by convention)."""
        return self.engine.args

    @property
    def startup_phases(self) -> dict[str, float]:
        """Seconds the engine took to start, by phase (files, weights, KV cache, warm-up)."""
        return dict(self.engine.startup_phases)

    @property
    def step_threads(self) -> StepThreads | None:
        """The per-step thread sizing the engine runs with (None: fixed threads)."""
        return self.engine.step_threads

    def enable_kv_events(self) -> None:
        """Record KV-cache events for a consumer that drains them (``drain_kv_events``)."""
        self.engine.enable_kv_events()

    def cached_block_hashes(self) -> set[bytes]:
        """Every block the prefix cache holds now. Read without the engine thread: may raise
        ``RuntimeError`` if the engine changes the cache during the copy (retry later)."""
        return self.engine.cached_block_hashes()

    def inject_fault(self, kind: str, request_id: str) -> None:
        """Test-only: ``"request"`` makes ``request_id``'s own sampling fail (that request
        alone ends with an error); ``"engine"`` makes the next model step raise (the engine
        loop dies, as on a lost device)."""
        engine = self.engine
        if kind == "request":

            def injector(phase: str, request: Any) -> None:
                if request.request_id == request_id and phase == "sample":
                    raise RuntimeError("debug hook: injected request fault")

            engine.fault_injector = injector
        elif kind == "engine":
            execute = engine.runner.execute

            def broken(sched: Any) -> Any:
                engine.runner.execute = execute
                raise RuntimeError("debug hook: injected engine fault")

            engine.runner.execute = broken
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each carries its delta); raises ValueError on bad input."""
        self.check_health()
        if not self._accepting:
            raise EngineOverloadedError("the replica is shutting down")
        params = params or SamplingParams()
        await self.prepare_structured(params)
        checked = self.engine.input_processor.process(prompt, params, prompt_token_ids)
        text, ids = checked.prompt, checked.token_ids
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            # Checked under the lock the dying engine thread takes to fail every stream, so a
            # request is either refused here or failed there: never left waiting on a dead loop.
            if self._error is not None:
                raise EngineDeadError(ENGINE_DEAD_MESSAGE)
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if (
                self.max_pending_requests is not None
                and len(self._streams) >= self.max_pending_requests
            ):
                raise EngineOverloadedError(
                    f"{len(self._streams)} requests in flight (limit {self.max_pending_requests})"
                )
            self._check_queue_delay(len(ids))
            self._streams[request_id] = stream
        self._inbox.put(_Add(request_id, ids, text, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def prepare_structured(self, params: SamplingParams) -> None:
        """Compile the request's grammar on a worker thread (a ``ValueError`` if it is bad or
        too slow to compile), so the engine thread only ever finds it cached. Returns at
        once, without yielding to the loop, when it is cached already."""
        if params.structured_outputs is not None:
            await self.engine.structured.compile_async(params.structured_outputs)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def expected_queue_delay_s(self, num_prompt_tokens: int = 0) -> float | None:
        """Seconds until a new prompt of that length would be fully prefilled, from the
        prefill work already queued and the engine's measured prefill rate (None: unknown)."""
        if self._prefill_rate is None:
            return None
        queued = self._stats.get("pending_prefill_tokens", 0) + num_prompt_tokens
        return queued / self._prefill_rate

    @property
    def prefill_tokens_per_s(self) -> float:
        """The measured prefill rate (a moving average over recent steps); 0 until measured."""
        return self._prefill_rate or 0.0

    @property
    def prefill_tokens_total(self) -> int:
        """Prompt tokens computed since the engine started (a counter: its rate over the
        prefill rate is how busy prefill keeps the replica)."""
        return self._prefill_tokens_total

    @property
    def decode_step_s(self) -> float:
        """Recent decode step time, i.e. every running request's inter-token latency (a
        moving average); 0 until measured."""
        return self._decode_step_s or 0.0

    def _check_queue_delay(self, num_prompt_tokens: int) -> None:
        """Shed at the door rather than admit a request the replica cannot serve in time.

        Two signals, both measured: the wait for prefill (queued prompt tokens over the
        prefill rate) bounds time to first token; the current inter-token latency (decode
        step time) says whether one more running request would slow everyone past their
        budget. Refusing early (429 + Retry-After) keeps the admitted requests' latency and
        lets the client go elsewhere; queueing would make every request late.
        """
        if not self._streams:
            return  # an idle replica always admits
        delay = self.expected_queue_delay_s(num_prompt_tokens)
        limit = self.max_queue_delay_s
        if limit is not None and delay is not None and delay > limit:
            raise EngineOverloadedError(
                f"expected queueing delay {delay:.1f}s exceeds the limit of {limit:g}s "
                "(max_queue_delay_s)"
            )
        itl, limit = self.expected_inter_token_latency_s(), self.max_inter_token_latency_s
        if limit is not None and itl is not None and itl > limit:
            raise EngineOverloadedError(
                f"expected inter-token latency {itl:.2f}s exceeds the limit of {limit:g}s "
                "(max_inter_token_latency_s)"
            )

    def expected_inter_token_latency_s(self) -> float | None:
        """Decode step time once one more request runs beside those in flight.

        Measured step time scaled by batch size (a CPU decode step is compute-bound, its time
        grows about linearly with the batch): requests admitted since the last measurement
        count too, so a burst is not all admitted before the measurement catches up.
        """
        if self._decode_step_s is None or self._decode_batch is None:
            return None
        return self._decode_step_s * (len(self._streams) + 1) / max(self._decode_batch, 1.0)

    def stats(self) -> dict[str, Any]:
        """Counters as of the last step (read without stopping the engine), plus the time
        spent in steps and the engine thread's wait for a core (``cpu_wait``) since start."""
        return {
            **self._stats,
            "engine_step_seconds": self._step_seconds_total,
            "engine_cpu_wait_seconds": self._cpu_wait.total if self._cpu_wait else 0.0,
        }

    def num_in_flight(self) -> int:
        return len(self._streams)

    def drain_kv_events(self):
        """KV events since the last drain (after ``enable_kv_events``). Read directly (the
        pool's event queue is thread-safe): no wait for the engine thread, which may be inside
        a long prefill step or dead."""
        return self.engine.drain_kv_events()

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine cannot serve: its loop died or stopped, a
        tensor-parallel worker is lost, or (watchdog) it holds requests but no step has
        finished for ``watchdog_s``."""
        if self._error is not None:
            raise EngineDeadError(ENGINE_DEAD_MESSAGE) from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")
        stalled = time.monotonic() - self._last_progress
        if self.watchdog_s is not None and self._streams and stalled > self.watchdog_s:
            raise EngineDeadError(
                f"engine stalled: no step finished in {stalled:.0f}s with "
                f"{len(self._streams)} requests in flight (watchdog {self.watchdog_s:g}s)"
            )
        self.engine.check_health()  # tensor-parallel workers alive and answering

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish (up to ``timeout_s``), then stop."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        # Whoever still waits gets a clear error now (the engine thread may be stuck or dead,
        # so this does not go through it); the aborts then free the blocks.
        self._fail_streams(EngineOverloadedError("the replica shut down before this finished"))
        self._stop.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # ---- the engine thread --------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and item.error is not None:
            item = RequestFailedError(item.error)
        with self._lock:
            stream = self._streams.get(request_id)
            done = isinstance(item, BaseException) or item.finished
            if done:
                self._streams.pop(request_id, None)
        if stream is not None:
            # RuntimeError: the caller's loop is closed; nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; True if any were."""
        applied = False
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if isinstance(cmd, _Add):
                if cmd.request_id not in self._streams:
                    continue  # aborted before it was added
                try:
                    self.engine.add_request(
                        cmd.prompt, cmd.params, cmd.request_id, prompt_token_ids=cmd.token_ids
                    )
                except ValueError as exc:
                    self._deliver(cmd.request_id, exc)
                except Exception:  # this request's fault alone
                    error_id = uuid.uuid4().hex[:12]
                    log.exception("adding %s failed (error id %s)", cmd.request_id, error_id)
                    self._deliver(
                        cmd.request_id,
                        RequestFailedError(
                            f"the server failed to start this request (error id {error_id})"
                        ),
                    )
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                with self._lock:
                    self._streams.pop(cmd[1], None)
                del out

    def _run(self) -> None:
        cpu_wait = CpuWaitMeter()  # on this thread: the counters are per thread
        self._cpu_wait = cpu_wait
        try:
            while not self._stop.is_set():
                if self._drain_inbox():
                    # What was just added counts before the step that computes it: a long
                    # prefill step (seconds on a CPU) must not hide its own queue from the
                    # router, admission and the autoscaler.
                    self._stats = self.engine.stats()
                if self.engine.has_unfinished_requests():
                    t0 = time.monotonic()
                    outputs = self.engine.step()
                    self._observe_step(time.monotonic() - t0)
                    cpu_wait.sample()
                    for out in outputs:
                        self._deliver(out.request_id, out)
                    self._stats = self.engine.stats()
                else:
                    self._stats = self.engine.stats()
                    self._last_progress = time.monotonic()
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as exc:
            log.exception("engine loop died")
            self._fail_streams(EngineDeadError(ENGINE_DEAD_MESSAGE), error=exc)
        else:
            self._drain_inbox()  # the aborts of a shutdown: their blocks go back to the pool
            self._fail_streams(EngineDeadError("the engine stopped"))

    def _observe_step(self, seconds: float) -> None:
        self._last_progress = time.monotonic()
        self._step_seconds_total += seconds
        if self.engine.last_step_decodes:
            self._decode_step_s = _ewma(self._decode_step_s, seconds)
            self._decode_batch = _ewma(self._decode_batch, self.engine.last_step_decodes)
        tokens = self.engine.last_step_prefill_tokens
        self._prefill_tokens_total += tokens
        if tokens >= MIN_RATE_SAMPLE_TOKENS and seconds > 0:
            self._prefill_rate = _ewma(self._prefill_rate, tokens / seconds)

    def _fail_streams(self, err: BaseException, error: BaseException | None = None) -> None:
        """End every open stream with ``err``; with ``error``, also mark the engine dead (under
        the same lock ``generate`` registers under, so no stream is added after this)."""
        with self._lock:
            if error is not None:
                self._error = error
            streams = list(self._streams.items())
            self._streams.clear()
        for request_id, stream in streams:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
            self._inbox.put(("abort", request_id))
        self._wake.set()
