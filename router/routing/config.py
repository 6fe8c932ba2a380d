"""Knobs of the prefix-aware router and of the replica-side cache reporter.

Every weight is in *prefill-token equivalents*: the router scores a replica by the work a
request would cost there, and a token the replica must prefill is the unit. That keeps the
numbers portable between a CPU replica (~1.8 ms per prefill token) and a GPU one (~0.05 ms):
only ratios matter, and the ratios (a decode step versus a prefill token, a queued token versus
one of ours) change far less between machines than the absolute times do.

Defaults come from ``bench/router_sim.py`` with the CPU SmolLM2 calibration (prefill 1.8 ms per
token, decode step 50 ms + 1 ms per running sequence, 2900 blocks of 16 tokens per replica);
the sweeps behind each number are in ``bench/RESULTS_router.md``. The lead re-checks them on
real runs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterConfig(BaseModel):
    """How :class:`~kvmesh.router.routing.core.PrefixRouterCore` trades cache hits for load.

    Passed as the ``request_router_kwargs`` of the deployment's ``request_router_config``;
    unknown keys are errors so a typo does not silently fall back to a default.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV block.")
    model_name: str = Field(default="", description="Label value for the router's metrics.")

    # ---- the cost of sending a request to a replica ----------------------------------------
    miss_weight: float = Field(
        default=2.0,
        ge=0.0,
        description=(
            "Weight of each prompt token the replica does not hold. Above 1 because a miss "
            "costs twice: our own prefill, and the cache space it takes from the replica's "
            "other conversations. Sim near saturation (16 replicas): 1.0 and 3.0 saturate "
            "~10% earlier than 1.5-2.0; 1.0 replicates hot prefixes too eagerly, 3.0 lets "
            "queues grow behind hot replicas."
        ),
    )
    queue_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of each prefill token queued at the replica (it runs before ours).",
    )
    decode_weight: float = Field(
        default=24.0,
        ge=0.0,
        description=(
            "Token equivalents per request resident on the replica (running or waiting). A "
            "running sequence slows every step (CPU: 1 ms per sequence per step against "
            "1.8 ms per prefill token) for its whole decode, and its conversation is likely "
            "to come back; spreading residents keeps steps short. Sim: 8-64 are "
            "indistinguishable, 0 saturates a little earlier."
        ),
    )
    kv_soft_limit: float = Field(
        default=0.85,
        ge=0.0,
        le=1.0,
        description=(
            "KV usage (blocks held by running requests) above which a replica is penalised: "
            "past it the replica evicts cached prefixes and soon preempts."
        ),
    )
    kv_penalty: float = Field(
        default=4096.0,
        ge=0.0,
        description="Penalty (token equivalents) at full KV usage, quadratic from the soft limit.",
    )
    tie_tolerance: float = Field(
        default=8.0,
        ge=0.0,
        description=(
            "Costs within this many token equivalents are a tie, broken at random so that "
            "identical cold requests spread instead of all landing on the first replica."
        ),
    )

    # ---- imbalance guard -------------------------------------------------------------------
    balance_abs: float = Field(
        default=8192.0,
        ge=0.0,
        description=(
            "Fall back to power-of-two choices when the best-scoring replica's load exceeds "
            "the least loaded one's by more than this many token equivalents ... A safety net "
            "for wrong estimates only: in the sim (fresh reports) it never helped, and a tight "
            "guard (1024, 1.5) halved the rate sustainable at the TTFT SLO by breaking locality."
        ),
    )
    balance_rel: float = Field(
        default=2.0,
        ge=1.0,
        description="... and is also more than this many times the least loaded one's load.",
    )

    # ---- what the router believes between reports ------------------------------------------
    speculative_ttl_s: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "How long a routed request's blocks count as cached on its replica before the "
            "replica's own report confirms them. Longer than queueing + prefill + one report "
            "period; a wrong guess (aborted request) misleads the router for at most this long."
        ),
    )
    pending_ttl_s: float = Field(
        default=5.0,
        gt=0.0,
        description=(
            "How long a routed request counts as extra load on its replica when the replica "
            "does not acknowledge it (no ``router_seq`` in its reports): about two report "
            "periods, after which the replica's reported load already includes it."
        ),
    )
    waiting_request_tokens: int = Field(
        default=512,
        ge=0,
        description=(
            "Prefill tokens assumed per waiting request when a replica reports only "
            "``num_requests_waiting`` and not ``pending_prefill_tokens``."
        ),
    )

    # ---- session affinity ------------------------------------------------------------------
    session_affinity: bool = Field(
        default=True,
        description="Keep a session (x-session-id) on its last replica while nearly as cheap.",
    )
    session_slack: float = Field(
        default=512.0,
        ge=0.0,
        description="How much costlier (token equivalents) the session's replica may be.",
    )
    session_ttl_s: float = Field(default=600.0, gt=0.0)
    max_sessions: int = Field(default=100_000, ge=1)

    decision_log: bool = Field(
        default=False,
        description="Keep a record of every routing decision (candidates, cost terms, choice, "
        "outcome): see kvmesh.router.routing.decision_log.",
    )
    decision_log_path: str | None = Field(
        default=None, description="Also append each finished record to this JSON-lines file."
    )
    decision_log_max: int = Field(
        default=10_000, ge=1, description="Records kept in memory (the oldest go first)."
    )
    seed: int | None = Field(default=None, description="Seed for tie-breaks and fallbacks.")


class ReporterConfig(BaseModel):
    """Size and cadence of what a replica reports through ``record_routing_stats``.

    Serve pulls ``record_routing_stats`` every ``request_routing_stats_period_s`` and
    re-broadcasts every replica's latest dict to every handle when any of them changes, so the
    payload must stay small: a few recent reports' worth of events, and a full snapshot only now
    and then.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ring_reports: int = Field(
        default=4,
        ge=1,
        description=(
            "Each payload repeats the events of this many recent reports, so a router that "
            "missed up to ring_reports - 1 broadcasts (long-poll coalescing) still catches up "
            "without a snapshot."
        ),
    )
    ring_max_events: int = Field(
        default=4096, ge=1, description="Hard cap on events per payload (9 bytes each)."
    )
    snapshot_interval_s: float = Field(
        default=15.0,
        gt=0.0,
        description=(
            "A full snapshot rides along at most this often (and in the first report), for "
            "routers that joined late or fell behind: a new ingress replica routes without "
            "the others' cache contents for up to this long. Each snapshot-bearing dict is "
            "re-broadcast to every handle until the replica's next report, so shorter costs "
            "bandwidth (8 bytes per cached block)."
        ),
    )
    max_snapshot_blocks: int = Field(
        default=32_768,
        ge=1,
        description="Snapshot cap (8 bytes per block); the most recently stored blocks are kept.",
    )

    @model_validator(mode="after")
    def _check(self) -> ReporterConfig:
        if self.ring_max_events < self.ring_reports:
            raise ValueError("ring_max_events must be at least ring_reports")
        return self
