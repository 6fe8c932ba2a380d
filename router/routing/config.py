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
    copy_penalty: float = Field(
        default=2.0,
        ge=0.0,
        description=(
            "Extra weight of each missed prompt token that another candidate replica already "
            "holds (the request would copy a cached prefix there), when the copy would take "
            "``copy_full_share`` of the replica's KV cache or more; proportionally less for a "
            "smaller copy. Needs the replica's cache size in its report (``kv_blocks_total``). "
            "Issue #15: on the 2-replica CPU run at 0.2 sessions/s (384 blocks per replica, "
            "four tenants' 1-3k-token system prompts) a new session of the popular tenant was "
            "copied to the other replica to skip a cold 3k-token prefill; the copy crowded "
            "that cache for the rest of the run. With 2: TTFT p90 median 2.10 s over 3 "
            "alternated rounds against 2.36 s with 0 (0.89x), no turn moved (3-7 before), one "
            "system-prompt refill per run (the peers' count); against Ray's router p90 1.02x and "
            "1.12x in two such runs (1.26x with 0). At 0.4 sessions/s it changed no decision. "
            "In the 16/64-replica sim (2,900 "
            "blocks, where a copy takes 2-9 % of a cache) the rate at the 2 s TTFT SLO moved "
            "+1 %/+2 % (16, seeds 0/1) and -3 %/+4 %/-5 % (64, seeds 0-2): within seed noise."
        ),
    )
    copy_full_share: float = Field(
        default=0.15,
        gt=0.0,
        le=1.0,
        description="Share of a replica's KV cache at which a copy pays the full copy_penalty.",
    )
    prefix_home: bool = Field(
        default=False,
        description=(
            "Remember which replica each prefix was last routed to, past its eviction, and "
            "price a move off that replica like a copy of a cached prefix (``copy_penalty``): "
            "a tenant evicted everywhere goes back to its replica instead of splitting over "
            "two caches, as a router keyed on routed text (Ray's) does. See "
            "kvmesh.router.routing.homes. Off by default (issue #15): on the 2-replica CPU "
            "run past saturation (0.2 sessions/s, 8 tenants, 384-block caches; 5 alternated "
            "rounds) it never split a tenant, but it also kept the first placement when that "
            "placement overfilled one cache: 2 of 5 rounds froze Ray's placement, whose busy "
            "replica recomputed 49.7k prompt tokens against the other's 15.3k (TTFT p90 "
            "28.2-28.5 s, as Ray's router in 4 of 5 rounds), median p90 14.8 s against 14.7 s "
            "without it (worst 19.9 s): where tenants outgrow the caches, letting an evicted "
            "tenant move is what rebalances the work."
        ),
    )
    prefix_home_blocks: int = Field(
        default=262_144,
        ge=1,
        description="Block keys the prefix-home memory keeps (least recently routed go first; "
        "~100 bytes each).",
    )
    fill_weight: float = Field(
        default=2.0,
        ge=0.0,
        description=(
            "Each missed prompt token pays this x how much fuller the replica's cache is than "
            "the emptiest candidate's (cached blocks / ``kv_blocks_total``, 0..1): stored "
            "in a fuller cache it evicts someone's prefix sooner. Steers cold prompts (a new "
            "tenant's first turn) to the emptier cache, e.g. beside the less popular tenant "
            "rather than the one whose conversations fill its replica, as Ray's and SGLang's "
            "routers do by picking the smaller prefix tree. Issue #15: on the 2-replica run "
            "a 5 % difference in measured prefill rates decided that placement (6,195 against "
            "6,547 token equivalents for a 3,183-token prompt) while the caches held 214 and "
            "153 of 384 blocks: at 2 the fuller cache pays 2 x 0.159 x 3,183 = 1,012 more, "
            "which outweighs rate differences up to ~15 %; at 1 one round of five still went "
            "the other way (not logged). "
            "In the 16/64-replica sim 2 is level with 0 (+0-3 %, seeds 0 and 1, within the "
            "sim's seed noise). Nothing for replicas that do not report their cache size, and "
            "nothing when all caches are equally full."
        ),
    )
    queue_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of each prefill token queued at the replica (it runs before ours).",
    )
    queue_soft_limit: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "Queued prefill tokens past which each further queued token weighs "
            "``queue_over_factor`` x ``queue_weight`` (None: linear). Meant to shed a hot "
            "prefix from its owner to a second replica once the owner's queue is long and to "
            "take it back when the queue drains: ``miss_weight`` charges a miss twice, so with "
            "a linear queue term the owner keeps the prefix until its queue is ``miss_weight`` "
            "x the prefix longer than the next replica's. Off by default (issue #15): at 2048 "
            "it cost 5% of the rate sustainable at the 5 s TTFT SLO in the 16-replica sim "
            "(33.1 vs 34.8 req/s; 29.5 vs 32.0 at 2 s: the extra spreading lowered the hit "
            "rate), and replayed over the 2-replica CPU run's decision log it moved 1 of 215 "
            "decisions: there the slow requests' other replica was no faster, queue for "
            "queue, once its recomputation was counted."
        ),
    )
    queue_over_factor: float = Field(
        default=2.0,
        ge=1.0,
        description=(
            "Past ``queue_soft_limit`` a queued token weighs this x ``queue_weight``: 2 makes "
            "it weigh what a missed token does (``miss_weight``) with the default weights."
        ),
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
    kv_penalty_by_miss: bool = Field(
        default=True,
        description=(
            "Scale the KV penalty by the share of the prompt the replica does not hold (the "
            "new blocks the request would take there). Issue #15: on the 2-replica CPU run at "
            "0.2 sessions/s a conversation's last turn, 1,488 of its 1,625 tokens cached on "
            "a replica whose running requests held all its blocks (usage 1.0), paid the full "
            "4,096-token penalty and went to the other replica: a 6.7 s cold prefill for a "
            "turn that needed 9 new blocks. Off: the flat penalty of earlier versions."
        ),
    )
    eviction_aware: bool = Field(
        default=False,
        description=(
            "Cut a replica's predicted cached prefix where the work queued ahead would evict "
            "it before the request is admitted (see ``PrefixIndex.surviving``): the replica "
            "reports what it holds now, but with a full cache every block it stores pushes out "
            "its least recently used one. On the 2-replica CPU run (384 blocks per replica, "
            "issue #15) 18 of 215 decisions predicted >256 more cached tokens than the replica "
            "then had, the worst a 2,400-token 'hit' that became a full prefill behind a long "
            "queue (33.8 s TTFT). Off by default: in the 16/64-replica sim it never fires "
            "(identical results), and in a 2-replica sim with the real run's 384-block caches "
            "it was mixed to worse on overloaded runs (seed 0: TTFT p90 15.7 -> 19.6 s at 0.3 "
            "req/s, 85 -> 70 s at 0.35; seed 2 worse at every rate; seed 1 unchanged): with "
            "queues longer than the cache it "
            "cuts nearly every unpinned prefix (predicted hit rate 0.27 against 0.52 found), "
            "which breaks locality as a tight imbalance guard does."
        ),
    )
    eviction_horizon: float = Field(
        default=1.0,
        gt=0.0,
        description=(
            "A prefix block counts as surviving while (blocks stored on the replica since its "
            "last use + blocks the queued work will store) < this x the replica's cache size "
            "(the most entries it has held since it first reported an eviction). Below 1 is "
            "more pessimistic: blocks "
            "held by running requests are not evictable, so the free LRU is smaller than the "
            "cache, but the most recently used blocks are mostly those held ones."
        ),
    )
    rate_aware: bool = Field(
        default=True,
        description=(
            "Price each replica's prefill work (its queue and our own miss) at that replica's "
            "measured prefill rate (``prefill_tokens_per_s`` in its routing stats) relative to "
            "the candidates' median rate: a replica draining half as fast weighs its queued "
            "and missed tokens twice, so the cost compares seconds, not tokens. With equal (or "
            "no) reported rates every factor is 1 and the policy is the token-count one. Issue "
            "#15: on the 2-replica CPU run the replica holding the long prompts drained ~130 "
            "tok/s against the other's ~170, so a token cost understated its wait. On by "
            "default on the evidence: on that run (quiet machine, one run each) TTFT p50/p90/"
            "p99 3.7/15.5/26.7 s against 7.8/20.0/27.7 s off (1 vs 6 requests shed); in the "
            "16/64-replica sim (identical replicas, rates differing only by step mix) the rate "
            "at the 5 s TTFT p90 SLO is +1%/+2%, at 2 s -6%/-1%."
        ),
    )
    default_prefill_tokens_per_s: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "Rate assumed for a replica that has not reported one (not yet measured, older "
            "version). None: the median of the rates the other candidates report, i.e. a "
            "typical replica; with no reported rate at all every factor is 1."
        ),
    )
    rate_max_ratio: float = Field(
        default=2.0,
        ge=1.0,
        description=(
            "Each replica's rate is clamped to [median / this, median x this] before use, so "
            "one odd measurement cannot exile a replica (or make it look free): two "
            "replicas' factors then differ by at most this squared."
        ),
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
