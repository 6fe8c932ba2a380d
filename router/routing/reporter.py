"""Replica side of the cache report: turns KV events and load into ``record_routing_stats``.

API for the replica deployment (the only calls it needs)::

    from kvmesh.router.routing import CacheReporter

    class ModelReplica:
        def __init__(self, ...):
            self.engine = AsyncLLM(...)
            self.reporter = CacheReporter(block_size=engine_args.block_size)

        async def generate(self, request: ReplicaRequest):
            self.reporter.on_request(request)   # acknowledges the router's stamp, if any
            ...

        def record_routing_stats(self) -> dict:  # Serve calls this every period
            return self.reporter.report(
                events=self.engine.drain_kv_events(),
                snapshot_fn=lambda: self.async_llm.cached_block_hashes(),
                load=self.engine.stats(),
            )

* ``events``: the ``BlockStored`` / ``BlockRemoved`` drained since the last call (all of them:
  the reporter numbers them, so none may be skipped). Draining here also keeps the engine's
  event list from growing without bound.
* ``snapshot_fn``: optional; called only when a snapshot is due (first report, then every
  ``snapshot_interval_s``) to correct the reporter's own mirror of the cache. Without it the
  mirror built from events is sent, which is exact as long as every event was passed in. If
  it raises ``RuntimeError`` (a set read while the engine thread changes it) the check is
  skipped for that snapshot.
* ``load``: a mapping with ``LLMEngine.stats()`` keys (``num_requests_running``,
  ``num_requests_waiting``, ``kv_cache_usage``, ``prefix_cache_queries``,
  ``prefix_cache_hits``) and, if the engine can tell, ``pending_prefill_tokens``; or a
  zero-argument callable returning one (called after the acknowledgements are captured, so the
  load never misses a request the router was told is included).

The returned dict is ``{"kvmesh": {...}}`` (layout in :mod:`kvmesh.router.routing.wire`); merge
other keys beside it if the replica reports more. ``report`` is cheap (no copy of the cache
except when a snapshot is due) and is safe to call from Serve's event loop, as is
``AsyncLLM.drain_kv_events`` (the block pool's event queue is thread-safe).

``load`` should include ``pending_prefill_tokens`` where the engine can count it (prompt tokens
admitted but not yet computed): without it the router assumes ``waiting_request_tokens`` per
waiting request, which misjudges long-prompt and cache-hit traffic alike.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kvmesh.replicas.kv.events import BlockRemoved, BlockStored
from kvmesh.router.routing.config import ReporterConfig
from kvmesh.router.routing.wire import (
    KEY_BYTES,
    OP_REMOVED,
    OP_STORED,
    PAYLOAD_KEY,
    SCHEMA_VERSION,
    LoadReport,
    block_key,
)

_LOAD_FIELDS = tuple(LoadReport.model_fields)


class CacheReporter:
    """Keeps a numbered ring of recent KV events and a mirror of the cache for snapshots."""

    def __init__(
        self,
        config: ReporterConfig | None = None,
        *,
        block_size: int = 16,
        clock: Callable[[], float] = time.monotonic,
        epoch: str | None = None,
    ) -> None:
        self.config = config or ReporterConfig()
        self.block_size = block_size
        self.epoch = epoch or secrets.token_hex(8)
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        # One chunk per report: (first event number, ops, keys).
        self._chunks: deque[tuple[int, bytes, bytes]] = deque()
        # Cached block keys in the order they were (last) stored, oldest first.
        self._mirror: OrderedDict[bytes, None] = OrderedDict()
        self._last_snapshot: float | None = None
        self._acks: dict[str, int] = {}

    # ---- per request --------------------------------------------------------------------
    def on_request(self, request: Any) -> None:
        """Note that a request stamped by a router (``router_id``, ``router_seq``) arrived.

        Reports then tell that router its request is inside the reported load, so it stops
        adding the request's tokens on top (exact load with many independent routers).
        Requests without a stamp are ignored.
        """
        router_id = getattr(request, "router_id", None)
        seq = getattr(request, "router_seq", 0) or 0
        if not router_id or seq <= 0:
            return
        with self._lock:
            if seq > self._acks.get(router_id, 0):
                self._acks[router_id] = seq

    def forget_router(self, router_id: str) -> None:
        """Drop a router's acknowledgement (bounded payload when ingress replicas churn)."""
        with self._lock:
            self._acks.pop(router_id, None)

    # ---- per period ---------------------------------------------------------------------
    def report(
        self,
        events: Iterable[Any] = (),
        snapshot_fn: Callable[[], Iterable[bytes]] | None = None,
        load: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Fold in ``events`` and return the dict for ``record_routing_stats`` to return."""
        with self._lock:
            self._append(events)
            now = self._clock()
            snap_keys, snap_full = b"", True
            due = self._last_snapshot is None or (
                now - self._last_snapshot >= self.config.snapshot_interval_s
            )
            if due:
                if snapshot_fn is not None:
                    try:
                        truth = snapshot_fn()
                    except RuntimeError:
                        # Read while the engine thread mutated it ("changed size during
                        # iteration"): the mirror from events is still exact; skip the check.
                        truth = None
                    if truth is not None:
                        self._resync_mirror(truth)
                snap_keys, snap_full = self._snapshot()
                self._last_snapshot = now
            acks = dict(self._acks)
            ev_first, ops, keys = self._ring()
            seq = self._seq
        load_map = load() if callable(load) else (load or {})
        payload = {
            "v": SCHEMA_VERSION,
            "epoch": self.epoch,
            "seq": seq,
            "ev_first": ev_first,
            "ev_ops": ops,
            "ev_keys": keys,
            "snap_seq": seq if due else -1,
            "snap_keys": snap_keys,
            "snap_full": snap_full,
            "load": _load_dict(load_map),
            "acks": acks,
            "block_size": self.block_size,
        }
        return {PAYLOAD_KEY: payload}

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the reporter believes are cached (its mirror)."""
        return len(self._mirror)

    # ---- internals ----------------------------------------------------------------------
    def _append(self, events: Iterable[Any]) -> None:
        ops = bytearray()
        keys = bytearray()
        mirror = self._mirror
        for event in events:
            if isinstance(event, BlockStored):
                key = block_key(event.block_hash)
                ops.append(OP_STORED)
                mirror[key] = None
                mirror.move_to_end(key)
            elif isinstance(event, BlockRemoved):
                key = block_key(event.block_hash)
                ops.append(OP_REMOVED)
                mirror.pop(key, None)
            else:
                raise TypeError(f"not a KV event: {event!r}")
            keys += key
        first = self._seq + 1
        self._seq += len(ops)
        self._chunks.append((first, bytes(ops), bytes(keys)))
        while len(self._chunks) > self.config.ring_reports:
            self._chunks.popleft()

    def _ring(self) -> tuple[int, bytes, bytes]:
        """The carried events: the last ``ring_reports`` reports', capped at ring_max_events."""
        ops = b"".join(c[1] for c in self._chunks)
        keys = b"".join(c[2] for c in self._chunks)
        extra = len(ops) - self.config.ring_max_events
        if extra > 0:
            ops, keys = ops[extra:], keys[extra * KEY_BYTES :]
        return self._seq - len(ops) + 1, ops, keys

    def _resync_mirror(self, hashes: Iterable[bytes]) -> None:
        truth = {block_key(h) for h in hashes}
        known = [k for k in self._mirror if k in truth]
        fresh = truth.difference(self._mirror)
        # Blocks we had not heard of go to the old end: we do not know when they were stored.
        self._mirror = OrderedDict.fromkeys([*fresh, *known])

    def _snapshot(self) -> tuple[bytes, bool]:
        cap = self.config.max_snapshot_blocks
        if len(self._mirror) <= cap:
            return b"".join(self._mirror), True
        newest = list(self._mirror)[-cap:]
        return b"".join(newest), False


def _load_dict(load: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields the router reads, as plain ints/floats (strict parsing on the far side)."""
    out: dict[str, Any] = {}
    for name in _LOAD_FIELDS:
        value = load.get(name)
        if value is None:
            continue
        out[name] = float(value) if name == "kv_cache_usage" else int(value)
    if "kv_cache_usage" in out:
        out["kv_cache_usage"] = min(max(out["kv_cache_usage"], 0.0), 1.0)
    return out
