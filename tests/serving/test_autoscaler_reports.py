"""The autoscaler's decisions reach the ingress: from Serve's controller, through the GCS."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def _report(serve_app, model: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    with serve_app.client() as c:
        while time.monotonic() < deadline:
            r = c.get("/debug/autoscaler")
            assert r.status_code == 200, r.text
            found = [x for x in r.json() if x["model"] == model]
            if found:
                return found[0]
            time.sleep(0.5)
    raise AssertionError(f"no autoscaler report for {model} within {timeout_s}s")


def test_decisions_are_published_and_exported(serve_app):
    report = _report(serve_app, "tiny-b")
    assert report["target"] == 1 and report["min_replicas"] == report["max_replicas"] == 1
    assert report["reason"] in {"hold", "at_max", "hold_no_metrics"}, report
    assert sum(report["decisions_total"].values()) >= 1
    with serve_app.client() as c:
        # Only autoscaled models have a report; the key guards it like /metrics.
        assert {x["model"] for x in c.get("/debug/autoscaler").json()} == {"tiny-b"}
        assert c.get("/debug/autoscaler", headers={"Authorization": ""}).status_code == 401
        text = c.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("kvmesh:autoscaler_")
    }
    model = ("model_name", "tiny-b")
    assert samples[("kvmesh:autoscaler_target_replicas", (model,))] == 1.0
    assert samples[("kvmesh:autoscaler_running_replicas", (model,))] == 1.0
    assert samples[("kvmesh:autoscaler_scale_events_total", (("direction", "up"), model))] == 0
    decisions = [v for (name, _), v in samples.items() if name.endswith("decisions_total")]
    assert decisions and sum(decisions) >= 1
