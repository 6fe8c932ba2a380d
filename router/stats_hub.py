"""The app's one place that knows every replica's latest stats.

Serve handles route a call to *some* replica, so the ingress cannot ask each model replica for
its numbers. Instead each replica pushes its engine stats and Prometheus text here every
``stats_push_period_s``; the ingress reads the lot for ``/metrics`` and ``/debug/replicas``.
A replica that stops pushing (it died) drops out after ``expiry_s``; one that shuts down
cleanly says so. Nothing is lost when the hub restarts: replicas push cumulative values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    model: str
    stats: dict[str, Any]
    metrics_text: str
    received: float


class StatsHub:
    def __init__(self, expiry_s: float = 5.0) -> None:
        self.expiry_s = expiry_s
        self._entries: dict[str, _Entry] = {}

    def push(self, model: str, replica: str, stats: dict[str, Any], metrics_text: str) -> None:
        self._entries[replica] = _Entry(model, stats, metrics_text, time.monotonic())

    def forget(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live replica: model, replica, stats, metrics_text, age_s."""
        now = time.monotonic()
        for replica in [r for r, e in self._entries.items() if now - e.received > self.expiry_s]:
            del self._entries[replica]
        return [
            {
                "model": e.model,
                "replica": replica,
                "stats": e.stats,
                "metrics_text": e.metrics_text,
                "age_s": now - e.received,
            }
            for replica, e in sorted(self._entries.items())
        ]
