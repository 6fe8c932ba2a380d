"""Router side of the cache report: bring one replica's index entries up to date.

Every router keeps, per replica, the report epoch and the number of the last event it applied.
Given the replica's latest payload (whatever broadcast it happened to see):

* same epoch, and the payload still carries every event after ours → apply just those;
* otherwise (first payload, replica restarted, or we missed more than the ring holds) → if the
  payload has a snapshot, replace the replica's entries with it; if not, apply what events it
  carries (they are newer than anything we know, so still an improvement), mark the replica
  *unsynced*, and wait for the next snapshot.

The outcome depends only on the payloads, never on which router applies them, so routers that
see the same reports converge on the same confirmed entries.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum

from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.wire import OP_STORED, CacheReport, split_keys


class SyncOutcome(StrEnum):
    UNCHANGED = "unchanged"
    EVENTS = "events"
    RESYNC = "resync"
    GAP = "gap"


@dataclass
class ReplicaSync:
    """What a router has applied from one replica's reports."""

    epoch: str | None = None
    last_seq: int = 0
    synced: bool = False
    """False until a snapshot (or the event stream from its start) covered everything."""


def apply_report(
    index: PrefixIndex, replica: Hashable, state: ReplicaSync, report: CacheReport
) -> SyncOutcome:
    """Apply ``report`` to ``index`` for ``replica``; updates ``state`` in place."""
    if report.epoch != state.epoch:
        # A new cache: nothing we confirmed about the old one holds.
        index.reset(replica, ())
        state.epoch, state.last_seq, state.synced = report.epoch, 0, False
        if report.ev_first == 1 and not report.has_snapshot:
            # We hold the stream from its first event: as good as a snapshot.
            state.synced = True
            _apply_events(index, replica, report, 0)
            state.last_seq = report.seq
            return SyncOutcome.RESYNC

    if report.seq == state.last_seq and state.synced:
        return SyncOutcome.UNCHANGED
    contiguous = report.ev_first <= state.last_seq + 1 and report.seq >= state.last_seq
    if state.synced and contiguous:
        _apply_events(index, replica, report, state.last_seq)
        state.last_seq = report.seq
        return SyncOutcome.EVENTS
    if report.has_snapshot:
        index.reset(replica, split_keys(report.snap_keys))
        _apply_events(index, replica, report, report.snap_seq)
        state.last_seq, state.synced = report.seq, True
        return SyncOutcome.RESYNC
    if report.seq < state.last_seq:
        # An older payload than one we applied (cannot happen with one controller; ignore).
        return SyncOutcome.UNCHANGED
    _apply_events(index, replica, report, state.last_seq)
    state.last_seq, state.synced = report.seq, False
    return SyncOutcome.GAP


def _apply_events(index: PrefixIndex, replica: Hashable, report: CacheReport, after: int) -> None:
    for op, key in report.events_after(after):
        if op == OP_STORED:
            index.store(replica, key)
        else:
            index.remove(replica, key)
