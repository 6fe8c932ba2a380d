"""The replica → router report: what ``record_routing_stats`` returns, and its parsing.

Serve polls each replica's ``record_routing_stats()``, keeps the latest dict per replica in the
controller, and long-polls the whole replica list (with every replica's dict) to every handle
whenever one of them changes; a handle that was slow sees only the newest dict. The dict is
pickled (any picklable value works) and, in the controller, ``str()``-ed for a hash each time
the replica list is rebuilt, so it must stay small. Hence:

* block hashes travel as their first :data:`KEY_BYTES` bytes, concatenated into one ``bytes``
  (a collision only misroutes one request; at 64 bits it needs ~4 billion cached blocks);
* events are numbered; a payload carries the last few reports' events (``ev_*``) so a router
  that missed a broadcast catches up, and a full snapshot (``snap_*``) now and then so a router
  that joined late or fell further behind resynchronises;
* the schema is versioned under one top-level key, so a replica can return other stats beside it.

Layout (``payload[PAYLOAD_KEY]``)::

    v         int    schema version (1)
    epoch     str    reporter instance; a new one means a new cache (replica restarted)
    seq       int    number of the last event (events count from 1)
    ev_first  int    number of the first event carried (ev_first > seq: none)
    ev_ops    bytes  one byte per event: 1 stored, 0 removed
    ev_keys   bytes  KEY_BYTES per event, same order
    snap_seq  int    -1, or the event number the snapshot is current to (== seq)
    snap_keys bytes  KEY_BYTES per cached block
    snap_full bool   False if the snapshot was capped
    load      dict   LoadReport fields
    acks      dict   router_id -> highest router_seq of that router seen by the replica
    block_size int

Beside the payload the router reads three top-level keys of the replica's dict, all optional:
``healthy`` (0: take no new requests), and the engine's own measurements
``prefill_tokens_per_s`` (moving average over recent prefill steps; 0 until measured) and
``decode_step_s`` (see :func:`parse_rates`). They live outside the payload because the
replica measures them, not the cache reporter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

KEY_BYTES = 8
PAYLOAD_KEY = "kvmesh"
SCHEMA_VERSION = 1
OP_REMOVED = 0
OP_STORED = 1


def block_key(block_hash: bytes) -> bytes:
    """The router-side name of a block: the first :data:`KEY_BYTES` bytes of its hash."""
    return block_hash[:KEY_BYTES]


def split_keys(blob: bytes) -> list[bytes]:
    return [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


class LoadReport(BaseModel):
    """A replica's load as of the report. Fields mirror ``LLMEngine.stats()``."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    num_requests_running: int = Field(default=0, ge=0)
    num_requests_waiting: int = Field(default=0, ge=0)
    kv_cache_usage: float = Field(default=0.0, ge=0.0, le=1.0)
    pending_prefill_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Prompt tokens admitted but not yet prefilled (waiting + partly prefilled).",
    )
    kv_blocks_total: int | None = Field(default=None, ge=0, description="KV cache size.")
    prefix_cache_queries: int | None = Field(default=None, ge=0)
    prefix_cache_hits: int | None = Field(default=None, ge=0)


class CacheReport(BaseModel):
    """One parsed payload; see the module docstring for the fields."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: int
    epoch: str
    seq: int = Field(ge=0)
    ev_first: int = Field(ge=1)
    ev_ops: bytes
    ev_keys: bytes
    snap_seq: int = -1
    snap_keys: bytes = b""
    snap_full: bool = True
    load: LoadReport
    acks: dict[str, int] = Field(default_factory=dict)
    block_size: int = Field(default=16, ge=1)

    def events_after(self, after_seq: int) -> Iterator[tuple[int, bytes]]:
        """``(op, key)`` of the carried events numbered above ``after_seq``, in order."""
        start = max(after_seq + 1, self.ev_first) - self.ev_first
        ops, keys = self.ev_ops, self.ev_keys
        for i in range(start, len(ops)):
            yield ops[i], keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]

    @property
    def has_snapshot(self) -> bool:
        return self.snap_seq >= 0


def parse_report(routing_stats: Mapping[str, Any] | None) -> CacheReport | None:
    """The kvmesh report inside a replica's routing stats, or None if absent or malformed.

    Malformed reports are dropped rather than raised: a replica running another version must
    not break routing for the others.
    """
    if not routing_stats:
        return None
    raw = routing_stats.get(PAYLOAD_KEY)
    if not isinstance(raw, Mapping) or raw.get("v") != SCHEMA_VERSION:
        return None
    try:
        report = CacheReport.model_validate(raw)
    except ValidationError:
        return None
    n = len(report.ev_ops)
    if len(report.ev_keys) != n * KEY_BYTES or len(report.snap_keys) % KEY_BYTES:
        return None
    if report.ev_first + n - 1 != report.seq:
        return None
    return report


PREFILL_RATE_KEY = "prefill_tokens_per_s"
DECODE_STEP_KEY = "decode_step_s"


def parse_rates(routing_stats: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """The replica's measured (prefill tokens per second, decode step seconds); None for
    each one absent, not yet measured (0), or not a positive finite number."""
    if not routing_stats:
        return None, None
    return _positive(routing_stats.get(PREFILL_RATE_KEY)), _positive(
        routing_stats.get(DECODE_STEP_KEY)
    )


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None
