"""A replica's Prometheus metrics, rendered as exposition text for the ingress to merge.

Each replica owns a private ``CollectorRegistry``: gauges and counters come from the engine's
``stats()`` at render time (the engine already counts them, so nothing is counted twice), and
latency histograms are observed once per finished request from the engine's own timestamps.
The text travels to the app's stats hub; the ingress merges every replica's text under one
``/metrics``. Names are vLLM's under the ``kvmesh:`` prefix, labelled ``model_name`` and
``replica`` (a replica's counters restart with it, so each replica is its own series).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmesh.replicas.outputs import RequestOutput

LABELS = ("model_name", "replica")

# Bucket edges follow vLLM's, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

_GAUGES = {
    "num_requests_running": "Requests in the engine's running batch.",
    "num_requests_waiting": "Requests queued in the engine, not yet scheduled.",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (1 = full).",
    "kv_blocks_free": "KV-cache blocks free (includes cached blocks no request holds).",
    "kv_blocks_total": "KV-cache blocks in the pool.",
}
_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "prompt_tokens": "Prompt tokens admitted.",
    "generation_tokens": "Tokens generated.",
    "num_preemptions": "Requests preempted (KV blocks reclaimed, recomputed later).",
    "engine_step_seconds": "Seconds the engine spent in steps.",
    "engine_cpu_wait_seconds": (
        "Seconds the engine's stepping thread waited for a CPU core while it had work (Linux "
        "run-queue wait; 0 where not reported). Over engine_step_seconds: the share of the "
        "engine's time other processes on the node took from it."
    ),
}
_STAT_KEY = {"kv_cache_usage_perc": "kv_cache_usage"}


class _EngineStatsCollector(Collector):
    """Yields gauges and counters from the engine stats most recently handed to ``render``,
    and the replica's start-up time by phase."""

    def __init__(self, labels: tuple[str, str], startup_phases: Mapping[str, float]) -> None:
        self.labels = list(labels)
        self.stats: dict[str, Any] = {}
        self.startup_phases = startup_phases

    def collect(self) -> Iterator[Metric]:
        for name, doc in _GAUGES.items():
            family = GaugeMetricFamily(f"kvmesh:{name}", doc, labels=LABELS)
            family.add_metric(self.labels, float(self.stats.get(_STAT_KEY.get(name, name), 0)))
            yield family
        for name, doc in _COUNTERS.items():
            family = CounterMetricFamily(f"kvmesh:{name}", doc, labels=LABELS)
            family.add_metric(self.labels, float(self.stats.get(name, 0)))
            yield family
        if self.startup_phases:
            family = GaugeMetricFamily(
                "kvmesh:replica_startup_seconds",
                "Seconds this replica spent starting, by phase (model_files, load_weights, "
                "kv_cache, kernels, warmup); their sum is the time to ready.",
                labels=[*LABELS, "phase"],
            )
            for phase, seconds in self.startup_phases.items():
                family.add_metric([*self.labels, phase], float(seconds))
            yield family


class ReplicaMetrics:
    def __init__(
        self, model_name: str, replica: str, startup_phases: Mapping[str, float] | None = None
    ) -> None:
        """``startup_phases``: seconds per start-up phase (``LLMEngine.startup_phases``)."""
        disable_created_metrics()  # *_created series only add noise to a merged exposition
        self.registry = CollectorRegistry(auto_describe=True)
        labels = (model_name, replica)
        self._stats = _EngineStatsCollector(labels, startup_phases or {})
        self.registry.register(self._stats)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                f"kvmesh:{name}", doc, LABELS, buckets=buckets, registry=self.registry
            ).labels(*labels)

        self.ttft = hist(
            "time_to_first_token_seconds", "Engine arrival to first token.", TTFT_BUCKETS
        )
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Engine arrival to last token.", E2E_BUCKETS)
        self._success = Counter(
            "kvmesh:request_success",
            "Requests finished, by finish reason.",
            [*LABELS, "finished_reason"],
            registry=self.registry,
        )
        self._labels = labels

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one finished request's latencies (engine clock, monotonic seconds)."""
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        for before, after in zip(m.token_times, m.token_times[1:], strict=False):
            self.itl.observe(after - before)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        reason = out.outputs[0].finish_reason or "unknown"
        self._success.labels(*self._labels, reason).inc()

    def render(self, stats: dict[str, Any]) -> str:
        self._stats.stats = stats
        return generate_latest(self.registry).decode()
