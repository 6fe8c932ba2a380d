"""The autoscaler's decisions, from Serve's controller to the ingress's ``/metrics``.

kvmesh's autoscaling policy runs inside Serve's controller process, not in any replica, so
its decisions cannot ride on the replicas' stats pushes. The policy writes its latest decision
for each model to Ray's GCS key-value store (one small JSON document per model, overwritten;
every node's processes can read it, and it survives an ingress or hub restart); the ingress
reads them when it renders ``/metrics`` or answers ``/debug/autoscaler``. Counters in the
document (decisions and scale events) are cumulative in the policy, so Prometheus sees
monotonic counters whichever ingress replica it scrapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

NAMESPACE = "kvmesh"
REPORT_STALE_S = 30.0
"""A report older than this is shown, but flagged: the controller stopped deciding."""


def _key(app: str, model: str) -> str:
    return f"autoscaler/{app}/{model}"


def publish(app: str, model: str, report: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(
        _key(app, model), json.dumps(report), overwrite=True, namespace=NAMESPACE
    )


def read(app: str, models: Iterable[str]) -> list[dict[str, Any]]:
    """The latest report of each model that has an autoscaler (others have none)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return []
    out = []
    for model in models:
        raw = internal_kv._internal_kv_get(_key(app, model), namespace=NAMESPACE)
        if raw:
            out.append(json.loads(raw))
    return out


def clear(app: str, models: Iterable[str]) -> None:
    """Forget an app's reports (``kvmesh down``)."""
    from ray.experimental import internal_kv

    for model in models:
        internal_kv._internal_kv_del(_key(app, model), namespace=NAMESPACE)


GAUGES = {
    "target_replicas": ("target", "Replicas the autoscaler wants."),
    "running_replicas": ("running", "Replicas Serve runs."),
    "starting_replicas": ("starting", "Replicas starting (capacity on its way)."),
    "min_replicas": ("min_replicas", "Configured lower bound."),
    "max_replicas": ("max_replicas", "Configured upper bound."),
    "needed_replicas": ("needed", "Replicas the current load needs at target utilisation."),
    "utilization": ("utilization", "Mean replica utilisation the autoscaler saw (1 = saturated)."),
    "queue_seconds": ("queue_s", "Mean queued prefill work per replica, in seconds."),
    "kv_cache_usage": ("kv_usage", "Mean KV-cache use the autoscaler saw."),
    "waiting_requests": ("waiting", "Waiting requests over all replicas."),
    "ttft_p90_seconds": ("ttft_p90_s", "Worst replica's recent TTFT p90."),
    "reporting_replicas": ("reporting", "Replicas with a usable report."),
    "last_decision_timestamp_seconds": ("time", "When the last published decision was made."),
}


def render(reports: Iterable[dict[str, Any]]) -> str:
    """``kvmesh:autoscaler_*`` in Prometheus text format, labelled ``model_name``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    reports = list(reports)

    class _Collector:
        def collect(self):
            for name, (field, doc) in GAUGES.items():
                g = GaugeMetricFamily(f"kvmesh:autoscaler_{name}", doc, labels=["model_name"])
                for r in reports:
                    g.add_metric([r["model"]], float(r.get(field, 0.0)))
                yield g
            last = GaugeMetricFamily(
                "kvmesh:autoscaler_last_decision",
                "1 for the reason of the latest decision.",
                labels=["model_name", "reason"],
            )
            decisions = CounterMetricFamily(
                "kvmesh:autoscaler_decisions",
                "Policy evaluations, by reason.",
                labels=["model_name", "reason"],
            )
            events = CounterMetricFamily(
                "kvmesh:autoscaler_scale_events",
                "Changes of the target, by direction.",
                labels=["model_name", "direction"],
            )
            for r in reports:
                last.add_metric([r["model"], r["reason"]], 1.0)
                for reason, n in sorted(r.get("decisions_total", {}).items()):
                    decisions.add_metric([r["model"], reason], float(n))
                for direction in ("up", "down"):
                    n = r.get("scale_events_total", {}).get(direction, 0)
                    events.add_metric([r["model"], direction], float(n))
            yield last
            yield decisions
            yield events

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry).decode()
