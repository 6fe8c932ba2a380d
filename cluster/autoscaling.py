"""How many replicas a model needs: kvmesh's autoscaling policy, in plain Python.

Request counts are a poor load signal for LLMs (one request decodes 10 tokens, the next 2,000).
This policy reads what each replica's engine knows instead (``record_autoscaling_stats``):

* **queue seconds**: prefill tokens admitted but not computed, divided by the replica's
  measured prefill rate. This is the time-to-first-token the next request will see, known
  *before* anyone has waited it: a burst of long prompts scales up at once.
* **prefill busy**: the share of the replica's prefill capacity the arriving prompts use
  (prefill tokens computed per second over the measured prefill rate). Queue seconds stay near
  zero until a replica is nearly saturated and then jump; this sees the load before it
  queues.
* **KV-cache use**: near full, the scheduler preempts running requests; and **preemptions**
  per second.
* **waiting requests**, for replicas that have not measured a prefill rate yet.
* **TTFT p90** over the last window and the **decode step time** (every running request's
  inter-token latency): what users already see, when a target is set. They trigger scale-ups
  only: latency is not load that spreads over replicas (a request's own prefill is in its
  TTFT however many replicas run), so it never keeps a replica that the load does not need.

Each replica's *utilisation* is the largest of these, each divided by its target (1.0 =
saturated). The fleet needs ``ceil(sum(utilisation) / target_utilization)`` replicas; it scales
up when that exceeds what is running *plus what is already starting* (capacity coming is
counted, so a slow start-up does not trigger a second scale-up), after the condition has held
``up_window_s``, at most ``max_step_up`` at a time. It scales down one replica at a time,
only when the same load spread over one replica fewer (the work, and the requests in batch
slots) stays below ``down_utilization`` for ``down_window_s`` and no scale-up happened in the
last ``down_cooldown_s``: the gap between the up and down thresholds, the windows and the
cooldown are the hysteresis that keeps it from flapping.

Reports older than ``stale_after_s`` and replicas that report themselves unhealthy are left
out (an unhealthy replica is being replaced by Serve: its last numbers mean nothing); with no
usable report at all the policy holds.

The core (:class:`Autoscaler`) imports no Ray, so ``bench/autoscale_sim.py`` runs this exact
code; :class:`ServeAutoscalingPolicy` adapts it to Ray Serve's ``AutoscalingPolicy``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmesh.router.autoscaler_reports import publish

log = logging.getLogger(__name__)
serve_log = logging.getLogger("ray.serve")


class AutoscalerConfig(BaseModel):
    """kvmesh's policy knobs (``models[].autoscaling`` keys besides Serve's own)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_queue_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds of queued prefill work at which a replica counts as saturated.",
    )
    kv_high: float = Field(
        default=0.85, gt=0, le=1, description="KV-cache use at which a replica is saturated."
    )
    waiting_high: float = Field(
        default=8.0,
        gt=0,
        description="Waiting requests at which a replica is saturated (used when the replica "
        "has not measured its prefill rate yet, and always as a bound).",
    )
    ttft_target_s: float | None = Field(
        default=None,
        gt=0,
        description="TTFT p90 at which a replica is saturated; null: TTFT is not a signal.",
    )
    itl_target_s: float | None = Field(
        default=None,
        gt=0,
        description="Decode step time (inter-token latency) at which a replica is saturated; "
        "null: not a signal.",
    )
    prefill_busy_high: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Share of the prefill capacity in use at which a replica is saturated.",
    )
    preemptions_high_per_s: float = Field(
        default=1.0, gt=0, description="Preemptions per second at which a replica is saturated."
    )
    target_utilization: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="Utilisation the fleet is sized for when it scales up (headroom for bursts).",
    )
    down_utilization: float = Field(
        default=0.45,
        gt=0,
        lt=1,
        description="Scale down only if the load over one replica fewer stays below this.",
    )
    up_window_s: float = Field(
        default=4.0, ge=0, description="Saturation must hold this long before a scale-up."
    )
    down_window_s: float = Field(
        default=60.0, ge=0, description="Low load must hold this long before a scale-down."
    )
    down_cooldown_s: float = Field(
        default=90.0, ge=0, description="No scale-down this soon after a scale-up."
    )
    max_step_up: int = Field(default=2, ge=1, description="Replicas added per decision, at most.")
    stale_after_s: float = Field(
        default=20.0, gt=0, description="Reports older than this are ignored."
    )
    signal_window_s: float = Field(
        default=2.0,
        gt=0,
        description="Replica gauges are averaged over this window (Serve keeps "
        "look_back_period_s of samples).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})"
            )
        if self.down_utilization >= self.target_utilization:
            raise ValueError(
                f"down_utilization ({self.down_utilization}) must be below target_utilization "
                f"({self.target_utilization}), or the policy would flap"
            )
        return self


@dataclass(frozen=True)
class ReplicaSignals:
    """One replica's latest report, as the policy reads it."""

    waiting: float = 0.0
    running: float = 0.0
    pending_prefill_tokens: float = 0.0
    kv_usage: float = 0.0
    prefill_tokens_per_s: float = 0.0
    """Measured prefill rate; 0 until the replica has measured one."""
    ttft_p90_s: float = 0.0
    """Over the replica's recent window; 0 with no recent requests."""
    decode_step_s: float = 0.0
    """Recent decode step time: every running request's inter-token latency."""
    prefill_busy: float = 0.0
    """Prefill tokens computed per second over the prefill rate (0 until measured)."""
    preemptions_per_s: float = 0.0
    max_num_seqs: float = 0.0
    """The replica's batch slots (0: not reported)."""
    healthy: bool = True
    age_s: float = 0.0
    """How old the report is."""

    @property
    def queue_s(self) -> float:
        if self.prefill_tokens_per_s <= 0:
            return 0.0
        return self.pending_prefill_tokens / self.prefill_tokens_per_s


@dataclass(frozen=True)
class FleetView:
    now: float
    replicas: Mapping[str, ReplicaSignals]
    """Running replicas that reported (by replica id)."""
    running: int
    """Replicas Serve counts as running."""
    target: int
    """Serve's current target: running + starting (a lower target means some are stopping)."""


class Reason(StrEnum):
    UP_QUEUE = "up_queue"
    UP_KV = "up_kv"
    UP_TTFT = "up_ttft"
    UP_ITL = "up_itl"
    UP_PREEMPTION = "up_preemption"
    UP_BUSY = "up_busy"
    UP_WAITING = "up_waiting"
    UP_MIN = "up_min"
    DOWN_LOW_LOAD = "down_low_load"
    DOWN_MAX = "down_max"
    HOLD = "hold"
    HOLD_STARTING = "hold_starting"
    HOLD_UP_WINDOW = "hold_up_window"
    HOLD_DOWN_WINDOW = "hold_down_window"
    HOLD_COOLDOWN = "hold_cooldown"
    HOLD_NO_METRICS = "hold_no_metrics"
    AT_MAX = "at_max"


_SIGNAL_REASON = {
    "queue": Reason.UP_QUEUE,
    "kv": Reason.UP_KV,
    "ttft": Reason.UP_TTFT,
    "itl": Reason.UP_ITL,
    "preemption": Reason.UP_PREEMPTION,
    "busy": Reason.UP_BUSY,
    "waiting": Reason.UP_WAITING,
}


@dataclass(frozen=True)
class Decision:
    target: int
    reason: Reason
    running: int
    starting: int
    needed: float
    """Replicas the current load needs at ``target_utilization``."""
    utilization: float
    """Mean utilisation of the reporting replicas (1.0 = saturated)."""
    queue_s: float
    """Mean queue seconds."""
    kv_usage: float
    waiting: float
    """Total waiting requests."""
    ttft_p90_s: float
    """Worst replica's TTFT p90."""
    reporting: int
    dominant: str = ""
    """The signal that set the utilisation: queue, busy, kv, waiting, preemption, ttft, itl."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason.value}


@dataclass
class PolicyState:
    """What the policy remembers between ticks (a plain dict in Serve's ``policy_state``)."""

    up_since: float | None = None
    down_since: float | None = None
    last_scale_up: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PolicyState:
        d = dict(d or {})
        return cls(
            up_since=d.get("up_since"),
            down_since=d.get("down_since"),
            last_scale_up=d.get("last_scale_up"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Autoscaler:
    """The decision: a fleet view and the remembered state in, a target and a reason out."""

    def __init__(self, config: AutoscalerConfig) -> None:
        self.config = config

    def load_parts(self, r: ReplicaSignals) -> dict[str, float]:
        """The load signals over their targets: work that spreads over replicas."""
        c = self.config
        return {
            "queue": r.queue_s / c.target_queue_s,
            "busy": r.prefill_busy / c.prefill_busy_high,
            "kv": r.kv_usage / c.kv_high,
            "waiting": r.waiting / c.waiting_high,
            "preemption": r.preemptions_per_s / c.preemptions_high_per_s,
        }

    def latency_parts(self, r: ReplicaSignals) -> dict[str, float]:
        """The latency signals over their targets (scale-up triggers only)."""
        c = self.config
        parts = {}
        if c.ttft_target_s is not None:
            parts["ttft"] = r.ttft_p90_s / c.ttft_target_s
        if c.itl_target_s is not None:
            parts["itl"] = r.decode_step_s / c.itl_target_s
        return parts

    def utilization(self, r: ReplicaSignals, *, latency: bool = True) -> tuple[float, str]:
        """How saturated one replica is (1.0 = at a limit), and which signal says so."""
        parts = self.load_parts(r)
        if latency:
            parts.update(self.latency_parts(r))
        dominant = max(parts, key=parts.__getitem__)
        return parts[dominant], dominant

    @staticmethod
    def batch_load(usable: Mapping[str, ReplicaSignals], running: int) -> float:
        """Requests in the fleet, in replicas' worth of batch slots (0 if slots unknown)."""
        slots = [r.max_num_seqs for r in usable.values() if r.max_num_seqs > 0]
        if not slots:
            return 0.0
        requests = sum(r.running + r.waiting for r in usable.values())
        requests *= max(running, len(usable)) / len(usable)  # the unreported as loaded
        return requests / (sum(slots) / len(slots))

    def decide(self, view: FleetView, state: PolicyState) -> Decision:
        c = self.config
        now = view.now
        starting = max(view.target - view.running, 0)
        usable = {
            rid: r for rid, r in view.replicas.items() if r.healthy and r.age_s <= c.stale_after_s
        }
        n = len(usable)
        loads = {rid: self.utilization(r, latency=False) for rid, r in usable.items()}
        # Replicas that are running but have not reported usably (just started, stale) are
        # assumed as loaded as the others; none reporting at all: hold.
        mean_u = sum(u for u, _ in loads.values()) / n if n else 0.0
        work = mean_u * max(view.running, n)
        needed = work / c.target_utilization
        # Latency over its target (mean over replicas): one more replica, whatever the load.
        latencies = [self.latency_parts(r) for r in usable.values()]
        late = {k: sum(p[k] for p in latencies) / n for k in (latencies[0] if n else {})}
        late_signal = max(late, key=late.__getitem__) if late else ""
        late_over = bool(late_signal) and late[late_signal] >= 1.0
        dominant = late_signal if late_over else (max(loads.values())[1] if loads else "")

        def decision(target: int, reason: Reason) -> Decision:
            return Decision(
                target=target,
                reason=reason,
                running=view.running,
                starting=starting,
                needed=round(needed, 3),
                utilization=round(mean_u, 4),
                queue_s=round(sum(r.queue_s for r in usable.values()) / n, 4) if n else 0.0,
                kv_usage=round(sum(r.kv_usage for r in usable.values()) / n, 4) if n else 0.0,
                waiting=sum(r.waiting for r in usable.values()),
                ttft_p90_s=max((r.ttft_p90_s for r in usable.values()), default=0.0),
                reporting=n,
                dominant=dominant,
            )

        current = view.target  # running + starting: capacity already on its way
        if current < c.min_replicas:
            state.up_since = state.down_since = None
            state.last_scale_up = now
            return decision(c.min_replicas, Reason.UP_MIN)
        if current > c.max_replicas:
            state.up_since = state.down_since = None
            return decision(c.max_replicas, Reason.DOWN_MAX)
        if n == 0:
            state.up_since = state.down_since = None
            return decision(current, Reason.HOLD_NO_METRICS)

        load_up = math.ceil(needed - 1e-9) > current and mean_u > c.target_utilization
        # Latency adds one replica at a time, and waits for it: what is starting may fix it.
        late_up = late_over and starting == 0
        if load_up or late_up:
            state.down_since = None
            if current >= c.max_replicas:
                state.up_since = None
                return decision(current, Reason.AT_MAX)
            if state.up_since is None:
                state.up_since = now
            if now - state.up_since < c.up_window_s:
                return decision(current, Reason.HOLD_UP_WINDOW)
            want = math.ceil(needed - 1e-9) if load_up else current
            if late_up:
                want = max(want, current + 1)
            target = min(want, current + c.max_step_up, c.max_replicas)
            state.up_since = None
            state.last_scale_up = now
            return decision(target, _SIGNAL_REASON.get(dominant, Reason.UP_QUEUE))
        state.up_since = None
        if starting and (mean_u > c.target_utilization or late_over):
            return decision(current, Reason.HOLD_STARTING)

        # Down: would the load still be comfortable on one replica fewer?
        if current > c.min_replicas and view.running >= current:
            if current > 1:
                # Both the work and the requests must fit: a replica has only so many batch
                # slots, and requests that do not get one wait (the load would bounce back).
                after = max(work, self.batch_load(usable, view.running)) / (current - 1)
                fits = after < c.down_utilization
            else:  # to zero: only with nothing at all running or waiting
                fits = all(r.running == 0 and r.waiting == 0 for r in usable.values())
            if fits:
                if state.last_scale_up is not None and now - state.last_scale_up < (
                    c.down_cooldown_s
                ):
                    state.down_since = None
                    return decision(current, Reason.HOLD_COOLDOWN)
                if state.down_since is None:
                    state.down_since = now
                if now - state.down_since < c.down_window_s:
                    return decision(current, Reason.HOLD_DOWN_WINDOW)
                state.down_since = None
                return decision(current - 1, Reason.DOWN_LOW_LOAD)
        state.down_since = None
        return decision(current, Reason.HOLD)


# ---- the Serve adapter ---------------------------------------------------------------------

SIGNAL_KEYS = {
    "waiting": "num_waiting",
    "running": "num_running",
    "pending_prefill_tokens": "pending_prefill_tokens",
    "kv_usage": "kv_cache_usage",
    "prefill_tokens_per_s": "prefill_tokens_per_s",
    "ttft_p90_s": "ttft_p90_s",
    "decode_step_s": "decode_step_s",
    "max_num_seqs": "max_num_seqs",
}

COUNTERS = {
    "num_preemptions": "preemptions_per_s",
    "prefill_tokens_total": "prefill_tokens_computed_per_s",
}
"""Reported counters the adapter turns into per-second rates over ``signal_window_s``."""

SMOOTHED = {
    "num_waiting",
    "num_running",
    "pending_prefill_tokens",
    "kv_cache_usage",
    "prefill_tokens_per_s",
    "ttft_p90_s",
    "decode_step_s",
}
"""Reported gauges the adapter averages over ``signal_window_s``."""
"""ReplicaSignals field -> the key the replica's ``record_autoscaling_stats`` reports."""


def signals_from_report(report: Mapping[str, float], age_s: float = 0.0) -> ReplicaSignals:
    """A replica's ``record_autoscaling_stats`` dict (plus the adapter's counter rates) as the
    policy's signals."""
    values = {f: float(report.get(key, 0.0)) for f, key in SIGNAL_KEYS.items()}
    rate = values["prefill_tokens_per_s"]
    computed = float(report.get("prefill_tokens_computed_per_s", 0.0))
    return ReplicaSignals(
        **values,
        prefill_busy=min(computed / rate, 1.0) if rate > 0 else 0.0,
        preemptions_per_s=float(report.get("preemptions_per_s", 0.0)),
        healthy=bool(report.get("healthy", 1.0)),
        age_s=max(age_s, 0.0),
    )


class ServeAutoscalingPolicy:
    """Ray Serve ``AutoscalingPolicy(policy_function=<this class>, policy_kwargs=...)``.

    Serve builds it once per deployment in its controller and calls it every control-loop
    tick with an ``AutoscalingContext``; it answers ``(target, policy_state)`` and Serve
    applies min/max. Each decision is also published (``router.autoscaler_reports``) for the
    ingress to show as ``kvmesh:autoscaler_*`` metrics, ``/debug/autoscaler`` and
    ``kvmesh status``.
    """

    def __init__(self, model: str = "", app: str = "", **knobs: Any) -> None:
        self.model = model
        self.app = app
        self.autoscaler = Autoscaler(AutoscalerConfig(**knobs))
        self._last: Decision | None = None
        self._published = 0.0
        self._decisions: dict[str, int] = {}
        self._scale_events = {"up": 0, "down": 0}

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = PolicyState.from_dict(ctx.policy_state)
        now = ctx.current_time or time.time()
        view = FleetView(
            now=now,
            replicas=self._signals(ctx, now),
            running=ctx.current_num_replicas,
            target=ctx.target_num_replicas,
        )
        d = self.autoscaler.decide(view, state)
        self._record(d, now, ctx.target_num_replicas)
        return d.target, state.as_dict()

    def _signals(self, ctx: Any, now: float) -> dict[str, ReplicaSignals]:
        """Per running replica: gauges averaged over ``signal_window_s`` of Serve's samples
        (a queue read at one instant swings between empty and full within one long prefill
        step), the latest value of the rest (health, counters, slots)."""
        window = self.autoscaler.config.signal_window_s
        values: dict[str, dict[str, float]] = {}
        stamp: dict[str, float] = {}
        for metric, per_replica in (ctx.raw_metrics or {}).items():
            for replica_id, series in per_replica.items():
                if not series:
                    continue
                rid = getattr(replica_id, "unique_id", str(replica_id))
                last = max(p.timestamp for p in series)
                stamp[rid] = max(stamp.get(rid, 0.0), last)
                if metric in COUNTERS:  # a rate over every sample Serve keeps
                    first = min(series, key=lambda p: p.timestamp)
                    latest = max(series, key=lambda p: p.timestamp)
                    dt = latest.timestamp - first.timestamp
                    rate = max(latest.value - first.value, 0.0) / dt if dt > 0 else 0.0
                    values.setdefault(rid, {})[COUNTERS[metric]] = rate
                    continue
                if metric in SMOOTHED:
                    recent = [p.value for p in series if p.timestamp >= last - window]
                    if metric == "prefill_tokens_per_s":  # 0 = not measured yet, not slow
                        recent = [v for v in recent if v > 0] or [0.0]
                    value = sum(recent) / len(recent)
                else:
                    value = max(series, key=lambda p: p.timestamp).value
                values.setdefault(rid, {})[metric] = value
        running = {getattr(r, "unique_id", str(r)) for r in ctx.running_replicas}
        return {
            rid: signals_from_report(report, now - stamp[rid])
            for rid, report in values.items()
            if rid in running
        }

    def _record(self, d: Decision, now: float, serve_target: int) -> None:
        last = self._last
        if last is not None and d.target > last.target:
            self._scale_events["up"] += 1
        elif last is not None and d.target < last.target:
            self._scale_events["down"] += 1
        changed = last is None or d.reason != last.reason or d.target != last.target
        if changed:  # in Serve's controller log, beside Serve's own scaling lines
            serve_log.info(
                "kvmesh autoscaler %s: target %d (%s; running %d, starting %d, needs %.2f, "
                "utilisation %.2f, queue %.2fs, kv %.2f, waiting %g, serve target %d)",
                self.model,
                d.target,
                d.reason.value,
                d.running,
                d.starting,
                d.needed,
                d.utilization,
                d.queue_s,
                d.kv_usage,
                d.waiting,
                serve_target,
            )
        self._last = d
        self._decisions[d.reason.value] = self._decisions.get(d.reason.value, 0) + 1
        # Serve ticks every 0.1 s: publish changes at once, the rest once a second.
        if not self.app or (not changed and now - self._published < PUBLISH_PERIOD_S):
            return
        self._published = now
        report = {
            **d.as_dict(),
            "model": self.model,
            "time": time.time(),
            "min_replicas": self.autoscaler.config.min_replicas,
            "max_replicas": self.autoscaler.config.max_replicas,
            "decisions_total": dict(self._decisions),
            "scale_events_total": dict(self._scale_events),
        }
        try:
            publish(self.app, self.model, report)
        except Exception:  # metrics must never stop the decision
            log.debug("autoscaler report not published", exc_info=True)


PUBLISH_PERIOD_S = 1.0
