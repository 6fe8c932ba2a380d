"""Smoke test of ``bench/autoscale_sim.py``: a 2-minute day through every policy."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import autoscale_sim as sim

SPECS = [
    sim.Spec("kvmesh", sim.kvmesh_knobs(), "kvmesh"),
    sim.Spec("kvmesh", {"ttft_target_s": None}, "kvmesh_no_ttft"),
    sim.Spec("ray_default", {"target_ongoing_requests": 8.0}),
    sim.Spec("keda_waiting", {"threshold": 5.0}),
    sim.Spec("llmd_saturation", {}),
    sim.Spec("static", {"replicas": 3}),
]


@pytest.fixture(scope="module")
def runs() -> dict[str, sim.RunResult]:
    trace = sim.Trace(
        duration_s=120.0,
        rate_night=2.0,
        rate_peak=5.0,
        bursts=((0.3, 30.0),),
        waves=((0.7, 15.0),),
    )
    arrivals = trace.arrivals()
    t0 = time.perf_counter()
    out = {
        s.name: sim.simulate(
            s, trace, arrivals, sim.CostModel(), cold_start_s=5.0, slo_base_s=2.0, sample_s=1.0
        )
        for s in SPECS
    }
    assert time.perf_counter() - t0 < 10.0
    return out


def test_every_policy_runs_within_bounds(runs: dict[str, sim.RunResult]) -> None:
    for name, r in runs.items():
        tl = r.timeline
        assert r.requests > 300, name
        assert len(tl["t"]) >= 100, name
        for running, starting in zip(tl["running"], tl["starting"], strict=True):
            assert sim.MIN_REPLICAS <= running + starting <= sim.MAX_REPLICAS, name
        assert sim.MIN_REPLICAS <= r.max_target <= sim.MAX_REPLICAS, name
        assert 0.0 <= r.slo_attainment <= 1.0, name
        assert r.replica_seconds >= 120.0 * sim.MIN_REPLICAS - 1e-6, name


def test_the_load_moves_the_real_policy(runs: dict[str, sim.RunResult]) -> None:
    # 5 requests/s is ~5 replicas of work: kvmesh's Autoscaler must add replicas.
    assert runs["kvmesh"].scale_ups >= 1
    assert runs["kvmesh"].policy["scale_up_reasons"]
    assert runs["static"].scale_events == 0
