"""kvmesh's autoscaling policy, decision by decision (pure Python: no Ray, no engine)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from kvmesh.cluster.autoscaling import (
    Autoscaler,
    AutoscalerConfig,
    FleetView,
    PolicyState,
    Reason,
    ReplicaSignals,
    ServeAutoscalingPolicy,
    signals_from_report,
)

CONFIG = dict(
    min_replicas=1,
    max_replicas=6,
    target_queue_s=2.0,
    kv_high=0.85,
    waiting_high=8.0,
    target_utilization=0.7,
    down_utilization=0.45,
    up_window_s=4.0,
    down_window_s=60.0,
    down_cooldown_s=90.0,
    max_step_up=2,
    stale_after_s=20.0,
)
RATE = 1000.0  # prefill tokens/s: a queue of 1000 tokens is one second of work
IDLE = ReplicaSignals(prefill_tokens_per_s=RATE)


def load(queue_s: float = 0.0, **kw) -> ReplicaSignals:
    return replace(IDLE, pending_prefill_tokens=queue_s * RATE, **kw)


def fleet(now: float, *replicas: ReplicaSignals, target: int | None = None) -> FleetView:
    running = len(replicas)
    return FleetView(
        now=now,
        replicas={f"r{i}": r for i, r in enumerate(replicas)},
        running=running,
        target=running if target is None else target,
    )


def policy(**overrides) -> Autoscaler:
    return Autoscaler(AutoscalerConfig(**{**CONFIG, **overrides}))


def run(autoscaler: Autoscaler, views: list[FleetView], state: PolicyState | None = None):
    state = state or PolicyState()
    return [autoscaler.decide(v, state) for v in views], state


# ---- each signal saturates a replica -------------------------------------------------------
@pytest.mark.parametrize(
    "signals, reason",
    [
        (load(queue_s=4.0), Reason.UP_QUEUE),  # 2x the queue target
        (load(kv_usage=0.99, waiting=1), Reason.UP_KV),
        (load(waiting=20), Reason.UP_WAITING),
        # No prefill rate measured yet: waiting requests are the signal.
        (ReplicaSignals(waiting=20, pending_prefill_tokens=50_000), Reason.UP_WAITING),
    ],
)
def test_each_signal_scales_up_after_the_window(signals, reason):
    a = policy()
    decisions, _ = run(a, [fleet(t, signals, signals) for t in (0.0, 2.0, 4.0)])
    assert [d.reason for d in decisions[:2]] == [Reason.HOLD_UP_WINDOW] * 2
    assert [d.target for d in decisions[:2]] == [2, 2]
    assert decisions[2].reason == reason and decisions[2].target > 2


@pytest.mark.parametrize(
    "signals, knob, signal",
    [
        (load(ttft_p90_s=5.0), {"ttft_target_s": 2.0}, "ttft"),
        (load(decode_step_s=0.5), {"itl_target_s": 0.2}, "itl"),
    ],
)
def test_latency_is_a_signal_only_with_a_target(signals, knob, signal):
    assert policy().utilization(signals)[0] < 0.1
    u, dominant = policy(**knob).utilization(signals)
    assert u == pytest.approx(2.5) and dominant == signal
    d = policy(up_window_s=0.0, **knob).decide(fleet(0.0, signals), PolicyState())
    assert d.reason == f"up_{signal}" and d.target == 2  # over target: one more replica
    # ... and then waits for it: no second one while the first is starting.
    d = policy(up_window_s=0.0, **knob).decide(fleet(0.0, signals, target=2), PolicyState())
    assert (d.target, d.reason) == (2, Reason.HOLD_STARTING)


def test_preemptions_and_prefill_busy_saturate_too():
    a = policy(up_window_s=0.0)
    d = a.decide(fleet(0.0, load(preemptions_per_s=5.0)), PolicyState())
    assert d.reason == Reason.UP_PREEMPTION and d.target == 3  # u = 5: +2, the step cap
    # 90 % of the prefill capacity in use: nothing queues yet, but the next burst will.
    d = a.decide(fleet(0.0, load(prefill_busy=0.9), load(prefill_busy=0.9)), PolicyState())
    assert d.reason == Reason.UP_BUSY and d.target == 4 and d.queue_s == 0.0


def test_scale_up_is_proportional_and_bounded_per_step():
    a = policy(up_window_s=0.0)
    # Two replicas at 5x saturation need ceil(2 * 5 / 0.7) = 15: two more at most per step.
    d = a.decide(fleet(0.0, load(queue_s=10.0), load(queue_s=10.0)), PolicyState())
    assert d.target == 4 and d.needed == pytest.approx(2 * 5 / 0.7, rel=1e-3)
    # Slightly over target utilisation: just enough replicas.
    d = a.decide(fleet(0.0, load(queue_s=1.6), load(queue_s=1.6)), PolicyState())
    assert d.target == 3  # 2 * 0.8 / 0.7 = 2.29


def test_max_replicas_caps_and_says_so():
    a = policy(up_window_s=0.0, max_replicas=2)
    d = a.decide(fleet(0.0, load(queue_s=10.0), load(queue_s=10.0)), PolicyState())
    assert (d.target, d.reason) == (2, Reason.AT_MAX)


def test_starting_replicas_count_as_capacity_coming():
    a = policy(up_window_s=0.0)
    # One replica saturated (needs 2), one more is already starting: hold, no second one.
    d = a.decide(fleet(0.0, load(queue_s=2.4), target=2), PolicyState())
    assert (d.target, d.reason, d.starting) == (2, Reason.HOLD_STARTING, 1)
    # Far more load than running + starting can take: scale up beyond the starting one.
    d = a.decide(fleet(0.0, load(queue_s=8.0), target=2), PolicyState())
    assert d.target == 4 and d.reason == Reason.UP_QUEUE


def test_a_blip_shorter_than_the_up_window_does_not_scale():
    a = policy()
    hot, calm = load(queue_s=4.0), load(queue_s=0.2)
    decisions, _ = run(a, [fleet(0, hot), fleet(2, hot), fleet(3, calm), fleet(5, hot)])
    assert all(d.target == 1 for d in decisions)
    assert decisions[-1].reason == Reason.HOLD_UP_WINDOW  # the window restarted


# ---- scale down: only when N-1 replicas carry the load with margin, for the window ----------
def test_scale_down_needs_the_window_and_fits_n_minus_one():
    a = policy()
    quiet = load(queue_s=0.2)  # u = 0.1 each; over 2 replicas: 0.3 / 2 = 0.15 < 0.45
    views = [fleet(t, quiet, quiet, quiet) for t in (0.0, 30.0, 59.0, 60.0, 61.0)]
    decisions, _ = run(a, views)
    assert [d.reason for d in decisions[:3]] == [Reason.HOLD_DOWN_WINDOW] * 3
    assert (decisions[3].target, decisions[3].reason) == (2, Reason.DOWN_LOW_LOAD)
    assert decisions[4].reason == Reason.HOLD_DOWN_WINDOW  # one at a time, window again


def test_no_scale_down_when_n_minus_one_would_be_busy():
    a = policy(down_window_s=0.0)
    # u = 0.5 each over 2: on 1 replica 1.0 > 0.45 -> stay.
    d = a.decide(fleet(0.0, load(queue_s=1.0), load(queue_s=1.0)), PolicyState())
    assert (d.target, d.reason) == (2, Reason.HOLD)


def test_no_scale_down_when_the_requests_would_not_find_batch_slots():
    """Twelve light streams on two replicas of 8 slots: little work, but one replica would
    leave four of them waiting (and the load would bounce straight back up)."""
    a = policy(down_window_s=0.0)
    light = load(running=6, kv_usage=0.05, max_num_seqs=8)
    assert a.decide(fleet(0.0, light, light), PolicyState()).reason == Reason.HOLD
    few = load(running=1, kv_usage=0.01, max_num_seqs=8)  # 2 of 8 slots on one replica
    assert a.decide(fleet(0.0, few, few), PolicyState()).reason == Reason.DOWN_LOW_LOAD


def test_hysteresis_the_band_between_thresholds_holds_steady():
    """Load oscillating inside the band neither adds nor removes a replica (no flapping)."""
    a = policy(up_window_s=0.0, down_window_s=0.0, down_cooldown_s=0.0)
    state = PolicyState()
    targets = []
    for t in range(200):
        q = 0.9 if t % 2 else 1.3  # u 0.45 .. 0.65 on each of 3 replicas
        d = a.decide(fleet(float(t), load(queue_s=q), load(queue_s=q), load(queue_s=q)), state)
        targets.append(d.target)
    assert set(targets) == {3}


def test_no_scale_down_during_the_cooldown_after_a_scale_up():
    a = policy(up_window_s=0.0, down_window_s=0.0)
    state = PolicyState()
    up = a.decide(fleet(0.0, load(queue_s=4.0)), state)
    assert up.target == 3
    quiet = load()
    d = a.decide(fleet(10.0, quiet, quiet, quiet), state)
    assert (d.target, d.reason) == (3, Reason.HOLD_COOLDOWN)
    d = a.decide(fleet(91.0, quiet, quiet, quiet), state)
    assert (d.target, d.reason) == (2, Reason.DOWN_LOW_LOAD)


def test_no_scale_down_while_replicas_are_still_starting_or_stopping():
    a = policy(down_window_s=0.0)
    d = a.decide(fleet(0.0, IDLE, IDLE, target=3), PolicyState())  # one still starting
    assert d.target == 3


# ---- bounds and bad inputs -----------------------------------------------------------------
def test_bounds_are_enforced_first():
    assert policy().decide(fleet(0.0), PolicyState()).reason == Reason.UP_MIN  # 0 < min 1
    assert policy(min_replicas=2).decide(fleet(0.0, IDLE), PolicyState()).target == 2
    d = policy(max_replicas=2).decide(fleet(0.0, IDLE, IDLE, IDLE), PolicyState())
    assert (d.target, d.reason) == (2, Reason.DOWN_MAX)


def test_stale_and_unhealthy_reports_are_ignored():
    a = policy(up_window_s=0.0)
    stale = load(queue_s=20.0, age_s=60.0)
    dead = load(queue_s=20.0, healthy=False)  # a dead replica's last numbers mean nothing
    d = a.decide(fleet(0.0, stale, dead), PolicyState())
    assert (d.target, d.reason, d.reporting) == (2, Reason.HOLD_NO_METRICS, 0)
    # With one usable report, the others are assumed as loaded as it is.
    d = a.decide(fleet(0.0, stale, dead, load(queue_s=0.2)), PolicyState())
    assert d.reporting == 1 and d.target == 3 and d.reason != Reason.DOWN_LOW_LOAD


def test_zero_min_replicas_scales_to_zero_when_idle():
    a = policy(min_replicas=0, down_window_s=0.0)
    d = a.decide(fleet(0.0, IDLE), PolicyState())
    assert (d.target, d.reason) == (0, Reason.DOWN_LOW_LOAD)
    d = a.decide(fleet(0.0, load(running=1, kv_usage=0.01)), PolicyState())
    assert d.target == 1  # one stream still decoding: not to zero


@pytest.mark.parametrize(
    "knobs, words",
    [
        ({"max_replicas": 1, "min_replicas": 2}, "min_replicas"),
        ({"down_utilization": 0.8, "target_utilization": 0.7}, "flap"),
        ({"kv_high": 1.5}, "kv_high"),
        ({"target_queue_s": 0}, "target_queue_s"),
        ({"max_step_up": 0}, "max_step_up"),
        ({"target_qeue_s": 1}, "target_qeue_s"),
    ],
)
def test_bad_knobs_are_refused_by_name(knobs, words):
    with pytest.raises(ValueError, match=words):
        AutoscalerConfig(**knobs)


def test_latency_triggers_scale_up_but_never_holds_replicas_the_load_does_not_need():
    """TTFT includes each request's own prefill however many replicas run: as a load signal
    it would pin the fleet at its maximum (the simulation showed 15 of 24 h at max)."""
    a = policy(down_window_s=0.0, ttft_target_s=2.0)
    slow_but_idle = load(ttft_p90_s=1.8, queue_s=0.1)  # 0.9 of the TTFT target, no load
    d = a.decide(fleet(0.0, slow_but_idle, slow_but_idle, slow_but_idle), PolicyState())
    assert (d.target, d.reason) == (2, Reason.DOWN_LOW_LOAD)


def test_policy_state_round_trips_through_a_plain_dict():
    a = policy()
    state = PolicyState()
    a.decide(fleet(0.0, load(queue_s=4.0)), state)
    again = PolicyState.from_dict(state.as_dict())
    assert again == state and again.up_since == 0.0


# ---- the Serve adapter -----------------------------------------------------------------------
def _ctx(now: float, reports: dict[str, dict[str, list[tuple[float, float]]]], **kw):
    """An AutoscalingContext as Serve builds it (the fields the adapter reads)."""
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue

    dep = DeploymentID(name="model-m", app_name="app")
    point = lambda t, v: TimeStampedValue(t, v)  # noqa: E731
    replica = lambda rid: ReplicaID(unique_id=rid, deployment_id=dep)  # noqa: E731
    raw: dict = {}
    for rid, metrics in reports.items():
        for metric, series in metrics.items():
            raw.setdefault(metric, {})[replica(rid)] = [point(t, v) for t, v in series]
    defaults = dict(
        current_time=now,
        raw_metrics=raw,
        running_replicas=[replica(r) for r in reports],
        current_num_replicas=len(reports),
        target_num_replicas=len(reports),
        policy_state={},
    )
    return SimpleNamespace(**{**defaults, **kw})


def test_serve_adapter_averages_gauges_and_turns_counters_into_rates():
    p = ServeAutoscalingPolicy(model="m", **{**CONFIG, "up_window_s": 0.0})
    busy = {
        "num_waiting": [(9.0, 0.0), (10.0, 3.0)],
        # The sample at t=2 is older than the 2 s window: not averaged in.
        "pending_prefill_tokens": [(2.0, 90_000.0), (9.0, 0.0), (10.0, 6000.0)],
        "prefill_tokens_per_s": [(9.0, 0.0), (10.0, RATE)],  # 0 = not measured yet
        # Counters: rates over every sample Serve keeps.
        "num_preemptions": [(6.0, 1.0), (10.0, 3.0)],  # 0.5/s
        "prefill_tokens_total": [(6.0, 0.0), (8.0, 1000.0), (10.0, 2400.0)],  # 600/s of 1000
        "healthy": [(10.0, 1.0)],
    }
    target, state = p(_ctx(10.5, {"a": busy}))
    d = p._last
    assert d.queue_s == pytest.approx(3.0) and d.waiting == pytest.approx(1.5)
    assert d.reason == Reason.UP_QUEUE and target == 3  # u = 1.5 needs ceil(1.5 / 0.7) = 3
    signals = p._signals(_ctx(10.5, {"a": busy}), 10.5)["a"]
    assert signals.preemptions_per_s == pytest.approx(0.5)
    assert signals.prefill_busy == pytest.approx(0.6)
    assert isinstance(state, dict) and state["last_scale_up"] == 10.5
    # A replica Serve no longer runs (being stopped) is not read.
    p(_ctx(11.0, {"a": busy}, running_replicas=[], policy_state=state))
    assert p._last.reporting == 0


def test_signals_from_a_replica_report():
    s = signals_from_report(
        {"healthy": 0.0, "num_waiting": 2.0, "kv_cache_usage": 0.5, "ttft_p90_s": 1.5}, age_s=3
    )
    assert (s.healthy, s.waiting, s.kv_usage, s.ttft_p90_s, s.age_s) == (False, 2, 0.5, 1.5, 3)
