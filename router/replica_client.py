"""The ingress side of the replica handle call: open a stream, map its failures to HTTP.

Opening waits for the replica's ``admitted`` chunk, so every failure before generation starts
(bad input the engine caught, a full queue, a replica that died or is shutting down) becomes a
proper HTTP status, and the stream's response headers can name the replica that took it.
Failures that happen before admission are retried on another replica (nothing has been sent
to the client yet); after admission they end the stream with an error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from kvmesh.replicas.serve_messages import ReplicaChunk, ReplicaError, ReplicaRequest
from kvmesh.router.errors import APIError
from kvmesh.router.routing import decision_log

log = logging.getLogger(__name__)

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

ReplicaTransport = Literal["grpc", "object_ref"]
"""How a request and its chunks travel between the ingress and a replica. ``grpc``: Serve's
direct gRPC channel between replicas, by value, plain pickle; ``object_ref``: Ray actor calls
whose every chunk is a Ray object (Serve's default). On 2 cores, gRPC took HTTP -> engine
from ~10.5 to 7-8 ms and token -> SSE from 3.0 to ~1.4 ms p50, and concurrency-16 output
throughput from 95-102 to 110-136 tokens/s (``bench/RESULTS.md``)."""


def stream_options(transport: ReplicaTransport) -> dict[str, Any]:
    """The handle options of a streamed ``generate`` call over ``transport``."""
    if transport == "object_ref":
        return {"stream": True}
    # Our messages are plain dataclasses: pickle suffices, cloudpickle would only be slower.
    return {
        "stream": True,
        "_by_reference": False,
        "request_serialization": "pickle",
        "response_serialization": "pickle",
    }


def to_api_error(err: ReplicaError, retry_after_s: int) -> APIError:
    if err.kind == "bad_request":
        return APIError(400, err.message, code="invalid_value")
    if err.kind == "overloaded":
        return APIError(
            429,
            f"the model is overloaded: {err.message}",
            code="overloaded",
            retry_after_s=retry_after_s,
        )
    if err.kind == "request_failed":
        return APIError(500, err.message, code="request_failed")
    if err.kind in ("shutting_down", "engine_dead"):
        return APIError(
            503,
            f"replica unavailable: {err.message}",
            code="replica_unavailable",
            retry_after_s=retry_after_s,
        )
    return APIError(500, f"replica error: {err.message}", code="internal_error")


class ReplicaStream:
    """Token chunks from one admitted request; ``cancel()`` aborts it on the replica."""

    cache_hit = False

    def __init__(
        self,
        gen: Any,
        admitted: ReplicaChunk,
        retry_after_s: int,
        req: ReplicaRequest | None = None,
        t_open: float | None = None,
    ) -> None:
        self._gen = gen
        self.admitted = admitted
        self.replica = admitted.replica
        self.done = False
        self._retry_after_s = retry_after_s
        self._req = req
        self._t_open = t_open
        self._reported = req is None  # the routing decision's outcome: once, at first output

    def _report(self, chunk: ReplicaChunk | None, error: str | None = None) -> None:
        """The decision log's outcome for this request (nothing unless a log is on)."""
        self._reported = True
        outcome: dict[str, Any] = {"replica": self.replica.rsplit("#", 1)[-1]}
        if chunk is not None:
            outcome["cached_tokens"] = chunk.num_cached_tokens
            if self._t_open is not None:
                outcome["ttft_s"] = time.monotonic() - self._t_open
            if self.admitted.t_received is not None and chunk.t_emit:
                outcome["replica_ttft_s"] = chunk.t_emit - self.admitted.t_received
        if error is not None:
            outcome["error"] = error
        decision_log.report_outcome(self._req.model, self._req.request_id, **outcome)

    async def __aiter__(self) -> AsyncIterator[ReplicaChunk]:
        try:
            async for chunk in self._gen:
                if chunk.error is not None:
                    self.done = True
                    if not self._reported:
                        self._report(None, chunk.error.kind)
                    raise to_api_error(chunk.error, self._retry_after_s)
                if not self._reported:
                    self._report(chunk)
                yield chunk
                if chunk.finish_reason is not None:
                    self.done = True
                    return
        except _REPLICA_GONE as exc:
            self.done = True
            if not self._reported:
                self._report(None, type(exc).__name__)
            log.warning("replica %s failed mid-stream: %r", self.replica, exc)
            raise APIError(
                503,
                f"the replica serving this request failed ({type(exc).__name__}); retry",
                code="replica_failed",
                retry_after_s=self._retry_after_s,
            ) from exc
        self.done = True
        raise APIError(500, "the replica ended the stream before the request finished")

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._gen.cancel()


async def open_stream(
    handle: Any, req: ReplicaRequest, *, retries: int = 4, retry_after_s: int = 1
) -> ReplicaStream:
    """Send ``req`` to a replica of ``handle`` (set up with ``stream_options``) and wait until
    one admits it.

    A replica that is gone, shutting down or whose engine died is retried with backoff
    (0.1, 0.3, 0.9, 2.7 s): long enough together for Serve's health check to take a broken
    replica out of the routing set (health_check_period_s, 2 s by default), since a broken
    replica answers at once and a load-based router would otherwise keep picking it.
    """
    delay, last = 0.1, "no attempt"
    t_open = time.monotonic()
    for attempt in range(retries + 1):
        gen = handle.generate.remote(req)
        try:
            first: ReplicaChunk = await gen.__anext__()
        except BackPressureError as exc:
            raise APIError(
                503,
                f"too many requests queued for {req.model}: {exc}",
                code="queue_full",
                retry_after_s=retry_after_s,
            ) from exc
        except _REPLICA_GONE as exc:
            last = f"{type(exc).__name__}: {exc}"
        except BaseException:
            gen.cancel()
            raise
        else:
            if first.error is None:
                return ReplicaStream(gen, first, retry_after_s, req, t_open)
            if first.error.kind not in ("shutting_down", "engine_dead"):
                raise to_api_error(first.error, retry_after_s)
            last = first.error.message
        if attempt < retries:
            log.info("retrying %s on another replica: %s", req.request_id, last)
            await asyncio.sleep(delay)
            delay *= 3
    raise APIError(
        503,
        f"no replica of {req.model} could take the request ({last})",
        code="replica_unavailable",
        retry_after_s=retry_after_s,
    )
