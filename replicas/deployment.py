"""One model replica as a Ray Serve deployment: ``AsyncLLM`` behind a streaming handle method.

``LLMServer`` is a plain class (constructible without Ray for tests); ``cluster/app.py`` wraps
its subclass ``LLMReplica`` with ``serve.deployment``. Serve calls the hooks defined here by name:

- ``generate`` streams ``ReplicaChunk`` s for one ``ReplicaRequest``. Serve cancels the
  generator when the caller goes away; leaving ``AsyncLLM.generate`` early aborts the request,
  which frees its KV blocks.
- ``check_health`` raises once the engine loop is dead, so Serve replaces the replica.
- ``record_routing_stats`` publishes load (and, once the router lands, cache contents) for the
  request router; ``record_autoscaling_stats`` publishes the load figures for autoscaling.
- ``__del__`` runs after Serve has drained ongoing requests (bounded by the deployment's
  ``graceful_shutdown_timeout_s``): the engine stops admitting and finishes what is left.

A background task pushes engine stats and Prometheus text to the app's stats hub, which the
ingress reads for ``/metrics`` and ``/debug/replicas``. With a cache reporter (the prefix-aware
router's, injected by the app builder: a replica never imports the router) the engine records
its KV-cache events and ``record_routing_stats`` drains them into the reporter's report;
without one the engine records none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.replicas.async_engine import (
    DEFAULT_WATCHDOG_S,
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
)
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.outputs import RequestOutput
from kvmesh.replicas.replica_metrics import ReplicaMetrics
from kvmesh.replicas.serve_messages import ReplicaChunk, ReplicaError, ReplicaRequest
from kvmesh.replicas.step_threads import (
    BURST_THREADS_HELP,
    DEFAULT_BURST_MIN_TOKENS,
    StepThreads,
)

log = logging.getLogger(__name__)


class ReplicaOptions(BaseModel):
    """Replica behaviour that is not an engine argument."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_pending_requests: int | None = Field(
        default=256, ge=1, description="Requests admitted to the engine at once; more get 429."
    )
    max_queue_delay_s: float | None = Field(
        default=30.0,
        gt=0,
        description="Refuse (429) a request whose expected wait for prefill exceeds this.",
    )
    max_inter_token_latency_s: float | None = Field(
        default=None,
        gt=0,
        description="Refuse (429) new requests while decode steps take longer than this.",
    )
    watchdog_s: float | None = Field(
        default=DEFAULT_WATCHDOG_S,
        gt=0,
        description="Unhealthy when requests are in flight and no step finished for this long.",
    )
    torch_threads: int | None = Field(default=None, ge=1)
    torch_threads_burst: int | None = Field(
        default=None,
        ge=1,
        description=BURST_THREADS_HELP,
    )
    burst_min_tokens: int = Field(default=DEFAULT_BURST_MIN_TOKENS, ge=1)
    stats_push_period_s: float = Field(default=0.5, gt=0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    report_cache: bool = Field(
        default=False,
        description="Report KV-cache contents for kvmesh's prefix-aware router.",
    )
    debug_hooks: bool = Field(
        default=False, description="Test-only: honour ReplicaRequest.debug_crash_after."
    )


RECENT_TTFT_WINDOW_S = 30.0


class CacheReporter(Protocol):
    """What the replica needs of a cache reporter (the prefix-aware router's
    ``kvmesh.router.routing.CacheReporter`` is one): acknowledge each request, and turn the
    KV events drained since the last call into the ``record_routing_stats`` payload."""

    def on_request(self, request: Any) -> None: ...

    def report(self, *, events: list, snapshot_fn: Callable[[], set], load: Any) -> dict: ...


CacheReporterFactory = Callable[..., CacheReporter]
"""Called as ``factory(block_size=...)`` once per replica."""


class RecentWindow:
    """Values of the last ``window_s`` seconds (bounded), for a recent percentile. ``now``
    defaults to the monotonic clock (a simulation passes its own)."""

    def __init__(self, window_s: float, max_len: int = 4096) -> None:
        self.window_s = window_s
        self._points: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_len)

    def add(self, value: float, now: float | None = None) -> None:
        self._points.append((time.monotonic() if now is None else now, value))

    def p90(self, now: float | None = None) -> float:
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        while self._points and self._points[0][0] < cutoff:
            self._points.popleft()
        if not self._points:
            return 0.0
        values = sorted(v for _, v in self._points)
        return values[min(len(values) - 1, int(0.9 * len(values)))]


def _replica_name(model_name: str) -> str:
    """Serve's replica id when running under Serve; a random one otherwise (tests)."""
    try:
        from ray import serve

        return f"{model_name}#{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # outside a replica there is no context
        return f"{model_name}#local-{uuid.uuid4().hex[:8]}"


class LLMServer:
    def __init__(
        self,
        engine_args: dict[str, Any],
        model_name: str,
        options: dict[str, Any] | None = None,
        stats_hub: Any | None = None,
        cache_reporter: CacheReporterFactory | None = None,
    ) -> None:
        """``cache_reporter``: builds the reporter of KV-cache contents for a prefix-aware
        router (used when the ``report_cache`` option is on)."""
        self.options = ReplicaOptions.model_validate(options or {})
        if self.options.torch_threads is not None:
            import torch

            torch.set_num_threads(self.options.torch_threads)
        # The served name is also the block-hash extra key: the ingress hashes with it too.
        args = EngineArgs.model_validate({**engine_args, "served_model_name": model_name})
        self.model_name = model_name
        self.engine = AsyncLLM(
            args,
            max_pending_requests=self.options.max_pending_requests,
            max_queue_delay_s=self.options.max_queue_delay_s,
            max_inter_token_latency_s=self.options.max_inter_token_latency_s,
            watchdog_s=self.options.watchdog_s,
            step_threads=self._step_threads(args),
        )
        self.replica = _replica_name(model_name)
        self.metrics = ReplicaMetrics(
            model_name, self.replica, startup_phases=self.engine.startup_phases
        )
        self._hub = stats_hub
        self._closing = False
        self._pusher: asyncio.Task | None = None
        self._cache_reporter = self._make_cache_reporter(cache_reporter)
        self._recent_ttft = RecentWindow(RECENT_TTFT_WINDOW_S)
        with contextlib.suppress(RuntimeError):  # no running loop outside Serve: start lazily
            asyncio.get_running_loop()
            self._ensure_pusher()
        log.info("replica %s ready (start-up phases: %s)", self.replica, self.startup_phases())

    def _step_threads(self, args: EngineArgs) -> StepThreads | None:
        """Per-step threads when ``torch_threads_burst`` is set (one-process engines only:
        tensor-parallel ranks keep their own thread counts)."""
        burst = self.options.torch_threads_burst
        if burst is None or args.tensor_parallel_size > 1:
            return None
        import torch

        base = self.options.torch_threads or torch.get_num_threads()
        return StepThreads(base, burst, self.options.burst_min_tokens)

    # ---- the request path -----------------------------------------------------------------
    async def generate(self, req: ReplicaRequest) -> AsyncIterator[ReplicaChunk]:
        """Stream one request: an ``admitted`` (or error) chunk, then token chunks."""
        t_received = time.time()
        self._ensure_pusher()
        if self._closing:
            yield self._error("shutting_down", "the replica is shutting down")
            return
        if self._cache_reporter is not None:
            self._cache_reporter.on_request(req)
        if self.options.debug_hooks and req.debug_fault is not None:
            self._inject_fault(req)
        try:  # a grammar compiles off the engine thread, before the request is queued
            await self.engine.prepare_structured(req.params)
        except ValueError as exc:
            yield self._error_for(exc)
            return
        # max_tokens None: as many as fit (the engine's input processor decides).
        stream = self.engine.generate(
            req.prompt,
            req.params,
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
        )
        # The first step runs validation and admission synchronously, then waits for a token:
        # one loop tick tells whether the engine took the request.
        first = asyncio.ensure_future(anext(stream))
        t_enqueued = time.time()
        await asyncio.sleep(0)
        if first.done() and first.exception() is not None:
            yield self._error_for(first.exception())
            return
        try:
            yield ReplicaChunk(
                replica=self.replica,
                admitted=True,
                num_prompt_tokens=len(req.prompt_token_ids),
                t_received=t_received,
                t_enqueued=t_enqueued,
                t_emit=t_enqueued,
            )
            sent = 0
            out = await first
            self._recent_ttft.add(time.time() - t_received)
            while True:
                yield self._chunk(out)
                sent += 1
                if out.finished:
                    self.metrics.observe_finished(out)
                    return
                self._maybe_crash(req, sent)
                out = await anext(stream)
        except (ValueError, EngineOverloadedError, EngineDeadError, RequestFailedError) as exc:
            yield self._error_for(exc)
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            await stream.aclose()  # aborts the request (frees its blocks) unless it finished

    def _chunk(self, out: RequestOutput) -> ReplicaChunk:
        completion = out.outputs[0]
        return ReplicaChunk(
            replica=self.replica,
            delta_text=out.delta_text,
            delta_token_ids=out.delta_token_ids,  # the step's own list: no copy
            delta_logprobs=out.delta_logprobs,
            finish_reason=completion.finish_reason,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            num_output_tokens=out.num_output_tokens,
            t_emit=time.time(),
        )

    def _error(self, kind: str, message: str) -> ReplicaChunk:
        return ReplicaChunk(replica=self.replica, error=ReplicaError(kind, message))  # type: ignore[arg-type]

    def _error_for(self, exc: BaseException) -> ReplicaChunk:
        if isinstance(exc, ValueError):
            return self._error("bad_request", str(exc))
        if isinstance(exc, EngineOverloadedError):
            kind = "shutting_down" if self._closing else "overloaded"
            return self._error(kind, str(exc))
        if isinstance(exc, EngineDeadError):
            return self._error("engine_dead", str(exc))
        if isinstance(exc, RequestFailedError):
            return self._error("request_failed", str(exc))
        # Anything else is a bug: its text may hold internals, so the log keeps it.
        error_id = uuid.uuid4().hex[:12]
        log.error("replica error (error id %s)", error_id, exc_info=exc)
        return self._error("internal", f"internal error (error id {error_id})")

    def _inject_fault(self, req: ReplicaRequest) -> None:
        """Test-only fault injection (``debug_hooks``), for the fault-isolation tests."""
        self.engine.inject_fault(req.debug_fault, req.request_id)  # type: ignore[arg-type]
        log.warning("debug hook: %s fault injected by %s", req.debug_fault, req.request_id)

    def _maybe_crash(self, req: ReplicaRequest, sent: int) -> None:
        if (
            self.options.debug_hooks
            and req.debug_crash_after is not None
            and sent >= req.debug_crash_after
        ):
            log.warning("debug hook: replica %s exits mid-stream", self.replica)
            os._exit(17)

    # ---- Serve hooks ----------------------------------------------------------------------
    async def check_health(self) -> None:
        """Raise when the engine loop has died: Serve then replaces this replica."""
        self._ensure_pusher()
        self.engine.check_health()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Load for the request router, the engine's measured speeds (the prefix-aware router
        prices each replica's queued and missed prompt tokens at its own prefill rate; 0 until
        measured), plus the cache contents it matches prefixes against."""
        return {**self.load(), **self._routing_rates(), **(await self._cache_contents())}

    def _routing_rates(self) -> dict[str, float]:
        return {
            "prefill_tokens_per_s": float(self.engine.prefill_tokens_per_s),
            "decode_step_s": float(self.engine.decode_step_s),
        }

    def startup_phases(self) -> dict[str, float]:
        """Seconds this replica took to start, by phase (files, weights, KV cache, kernels,
        warm-up): the ``kvmesh:replica_startup_seconds`` gauge."""
        return {k: round(v, 3) for k, v in self.engine.startup_phases.items()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What kvmesh's autoscaling policy reads (``cluster/autoscaling.py``): the load
        figures, the queued prefill work, the prefill rate and counter, the decode step time,
        recent TTFT p90, the preemption counter and the batch slots (from one stats
        snapshot)."""
        s = self.engine.stats()
        return {
            **{k: float(v) for k, v in self.load(s).items()},
            "pending_prefill_tokens": float(s.get("pending_prefill_tokens", 0)),
            "prefill_tokens_per_s": float(self.engine.prefill_tokens_per_s),
            "decode_step_s": float(self.engine.decode_step_s),
            "prefill_tokens_total": float(self.engine.prefill_tokens_total),
            "ttft_p90_s": self._recent_ttft.p90(),
            "num_preemptions": float(s.get("num_preemptions", 0)),
            "max_num_seqs": float(self.engine.args.max_num_seqs),
        }

    def load(self, s: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load figures (from the engine stats ``s``, or a fresh snapshot); a replica whose
        engine cannot serve says so (``healthy`` 0) rather than reporting its last,
        idle-looking numbers."""
        s = self.engine.stats() if s is None else s
        return {
            "healthy": int(self.healthy()),
            "num_waiting": s["num_requests_waiting"],
            "num_running": s["num_requests_running"],
            "num_in_flight": self.engine.num_in_flight(),
            "kv_cache_usage": s["kv_cache_usage"],
            "kv_blocks_free": s["kv_blocks_free"],
            "kv_blocks_total": s["kv_blocks_total"],
        }

    def healthy(self) -> bool:
        try:
            self.engine.check_health()
        except Exception:
            return False
        return True

    def stats(self) -> dict[str, Any]:
        """Engine counters plus identity, for ``/debug/replicas`` and tests."""
        return {
            "replica": self.replica,
            "model": self.model_name,
            "healthy": self.healthy(),
            "num_in_flight": self.engine.num_in_flight(),
            **self.engine.stats(),
        }

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish (up to the timeout), stop the engine."""
        if self._closing:
            return
        self._closing = True
        if self._pusher is not None:  # before the engine stops: a drain waits on its thread
            self._pusher.cancel()
            await asyncio.gather(self._pusher, return_exceptions=True)
        await self.engine.shutdown(
            self.options.shutdown_timeout_s if timeout_s is None else timeout_s
        )
        if self._hub is not None:
            with contextlib.suppress(Exception):
                await self._hub.forget.remote(self.replica)

    # ---- ROUTER PLUG-IN POINT ---------------------------------------------------------------
    # The prefix-aware router (router/request_router.py) reads what a replica-side cache
    # reporter builds from the engine's KV-cache events. The app builder injects the
    # reporter's factory (``cache_reporter``); the reporter acknowledges each request in
    # ``generate`` and its report rides in ``record_routing_stats``. Without one (any other
    # router) the engine records no events at all.
    def _make_cache_reporter(self, factory: CacheReporterFactory | None) -> CacheReporter | None:
        if not self.options.report_cache:
            return None
        if factory is None:
            raise ValueError("report_cache needs a cache_reporter factory")
        self.engine.enable_kv_events()
        return factory(block_size=self.engine.args.block_size)

    async def _cache_contents(self) -> dict[str, Any]:
        if self._cache_reporter is None:
            return {}
        # Every event goes to the reporter (it numbers them), so only this path drains them.
        return self._cache_reporter.report(
            events=self.engine.drain_kv_events(),
            snapshot_fn=self.engine.cached_block_hashes,
            load=self.engine.stats(),
        )

    # ---- stats push ---------------------------------------------------------------------------
    def _ensure_pusher(self) -> None:
        if self._pusher is None and not self._closing:
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    async def _push_loop(self) -> None:
        """Publish stats every ``stats_push_period_s``."""
        while not self._closing:
            try:
                if self._hub is not None:
                    stats = self.stats()
                    await self._hub.push.remote(
                        self.model_name, self.replica, stats, self.metrics.render(stats)
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # a missed push is retried next period
                log.debug("stats push failed", exc_info=True)
            await asyncio.sleep(self.options.stats_push_period_s)


class LLMReplica(LLMServer):
    """``LLMServer`` as Serve runs it: Serve awaits ``__del__`` once it has drained the
    replica's ongoing requests, so the engine finishes what it holds before the process ends.
    (Kept off ``LLMServer`` itself: a coroutine ``__del__`` is only right where Serve calls it.)
    """

    async def __del__(self) -> None:
        await self.shutdown()
