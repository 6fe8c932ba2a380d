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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvmesh.replicas.config import EngineArgs
from kvmesh.replicas.engine import LLMEngine, Prompt
from kvmesh.replicas.outputs import RequestOutput
from kvmesh.replicas.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def build_engine(args: EngineArgs) -> LLMEngine:
    """One process for ``tensor_parallel_size == 1``; Ray workers (``TPEngine``) above that."""
    if args.tensor_parallel_size > 1:
        from kvmesh.replicas.tp.engine import TPEngine

        return TPEngine(args)
    return LLMEngine(args)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; the replica must be replaced."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued; retry later (HTTP 429/503)."""


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
        **kwargs: Any,
    ) -> None:
        self.engine = engine or build_engine(args or EngineArgs(**kwargs))
        self.max_pending_requests = max_pending_requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._stats: dict[str, Any] = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine", daemon=True)
        self._thread.start()

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
        if prompt_token_ids is None:
            text, ids = self.engine.tokenize(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        self.engine.validate(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if (
                self.max_pending_requests is not None
                and len(self._streams) >= self.max_pending_requests
            ):
                raise EngineOverloadedError(
                    f"{len(self._streams)} requests in flight (limit {self.max_pending_requests})"
                )
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

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Counters as of the last step (read without stopping the engine)."""
        return dict(self._stats)

    def num_in_flight(self) -> int:
        return len(self._streams)

    def drain_kv_events(self):
        """KV events since the last drain. Read directly (the pool's event queue is
        thread-safe): no wait for the engine thread, which may be inside a long prefill step
        or dead."""
        return self.engine.drain_kv_events()

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")
        self.engine.check_health()  # tensor-parallel workers alive and answering

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish (up to ``timeout_s``), then stop."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stop.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # ---- the engine thread --------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            done = isinstance(item, BaseException) or item.finished
            if done:
                self._streams.pop(request_id, None)
        if stream is not None:
            # RuntimeError: the caller's loop is closed; nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                if cmd.request_id not in self._streams:
                    continue  # aborted before it was added
                try:
                    self.engine.add_request(
                        cmd.prompt, cmd.params, cmd.request_id, prompt_token_ids=cmd.token_ids
                    )
                except ValueError as exc:
                    self._deliver(cmd.request_id, exc)
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                with self._lock:
                    self._streams.pop(cmd[1], None)
                del out

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                    self._stats = self.engine.stats()
                else:
                    self._stats = self.engine.stats()
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as exc:
            log.exception("engine loop died")
            self._error = exc
            err = EngineDeadError(f"engine loop died: {exc!r}")
            with self._lock:
                ids = list(self._streams)
            for request_id in ids:
                self._deliver(request_id, err)
