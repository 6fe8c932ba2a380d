"""``/metrics``: the ingress's own metrics plus every replica's, merged into one exposition.

Replicas render their metrics as Prometheus text (``replicas/replica_metrics.py``) and push it
to the stats hub. Concatenating texts would repeat each family's HELP/TYPE lines, which
Prometheus rejects, so we parse every text with ``prometheus_client.parser`` and re-render each
family once with the samples of all replicas (their ``replica`` label keeps series apart).

The ingress's own histograms measure what the serving layer adds on top of the engine:
``kvmesh:serving_overhead_seconds{stage="ingress_to_engine"}`` from the HTTP request reaching
the ingress to the replica handing it to the engine, and ``{stage="engine_to_sse"}`` from a
token leaving the engine to its SSE chunk leaving the ingress. Two parts of the first are
recorded too, to tell where it goes: ``ingress_handling`` (arrival to the handle call: parsing,
tokenising, hashing) and ``handle_to_replica`` (the handle call to the replica starting on it:
Serve's routing and transport).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

OVERHEAD_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)


class IngressMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # *_created series only add noise to a merged exposition
        self.registry = CollectorRegistry(auto_describe=True)
        self.overhead = Histogram(
            "kvmesh:serving_overhead_seconds",
            "Time the serving layer adds: ingress_to_engine (HTTP arrival to engine queue) and "
            "engine_to_sse (token out of the engine to its SSE chunk leaving the ingress).",
            ["model_name", "stage"],
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "kvmesh:http_requests",
            "HTTP requests answered by the ingress, by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.response_cache = Counter(
            "kvmesh:response_cache_lookups",
            "Response-cache lookups, by result (hit/miss).",
            ["model_name", "result"],
            registry=self.registry,
        )

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(texts: Iterable[str]) -> str:
    """One valid exposition from several: each family once, holding every text's samples."""
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            have = merged.get(family.name)
            if have is None:
                merged[family.name] = family
            else:
                have.samples.extend(family.samples)
    return generate_latest(_Families(merged.values())).decode()  # type: ignore[arg-type]
