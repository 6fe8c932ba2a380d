"""Issue #15: the tail cases found in the 2-replica CPU run's decision log, replayed as scripted
arrivals and replica reports against the Ray-free core.

(b) Stale prediction after eviction: a replica's report says it holds a tenant's prefix, but its
    cache is full and the work queued ahead of a new request will push that prefix out before
    the request is admitted (the run's worst request: 2,400 tokens predicted cached, 0 found,
    33.8 s). The replica here is a real ``BlockPool``, so "what it then had" is the engine's
    own LRU, not an assumption of the test. ``eviction_aware`` (off by default, see
    RouterConfig for the simulations behind that) cuts the prediction.
(a) Hot-tenant pile-up: the owner of a hot prefix keeps winning while its queue grows, because
    its cached tokens outweigh the other replica's shorter queue. ``queue_soft_limit`` (off by
    default, see RouterConfig) sheds the prefix to a second replica past the limit and takes
    it back once the queue drains.
(c) Tokens are not seconds: the replica that got the long prompts drained its queue at ~130
    prefill tokens/s against the other's ~170, so it was sent requests for holding fewer
    queued tokens while its queue was the longer one in seconds. ``rate_aware`` (on) prices
    each replica's prefill terms at the rate it reports (``prefill_tokens_per_s``).
(d) A full replica is not full for a turn it already holds: at 0.2 sessions/s a
    conversation's last turn (1,488 of its 1,625 tokens cached) found its replica at KV usage
    1.0, paid the whole KV penalty (4,096) and went to the idle replica, where it prefilled all
    1,625 tokens (6.7 s). ``kv_penalty_by_miss`` (on) scales the penalty by the share of the
    prompt that would take new blocks.
(e) A copy to dodge a passing queue: at 0.2 sessions/s, in 2 of 3 rounds a new session of the
    popular tenant (1,024 of its 1,143 tokens cached on its replica) went to the other replica
    because its own was prefilling another tenant's cold 3,183-token prompt. That request won
    ~2 s; but the prefix now lived on both replicas, the tenant's traffic split between them,
    and the other replica held three tenants' system prompts (5,128 tokens) in a 6,144-token
    cache and evicted for the rest of the run (TTFT p90 1.2-1.3x the peer routers', which
    never moved it). ``copy_penalty`` prices a miss on tokens another replica holds by the
    share of the receiving cache the copy takes.
(f) A cold tenant placed by rate noise: with (e) fixed, the 4th tenant's cold 3,183-token
    first turn found both replicas idle and cost 6,195 against 6,547 token equivalents, the
    5 % difference in their measured prefill rates (which mostly says which replica had
    prefilled the longer prompts): it went beside the popular tenant, whose replica's cache
    already held 214 of 384 blocks against the other's 153 (Ray's router puts it beside the
    less popular tenant, its smaller prefix tree). ``fill_weight`` prices a missed token by
    how much fuller the cache it lands in is than the emptiest candidate's.
(g) A tenant evicted everywhere is split: past saturation (0.2 sessions/s, 8 tenants) a
    replica evicts a tenant's 1-3k-token system prompt while that tenant's next request
    waits behind long prefills. The index forgets the prefix, the request is cold on both
    replicas, and load and fill place it on the other one; the tenant's later conversations
    then follow whichever replica cached them last, so its working set lives in two 384-block
    caches (the popular tenant split 17/21 and 18/20 of its requests in 3 of 8 runs; Ray's
    router, keyed on routed text, never split a tenant in 5). ``prefix_home`` remembers where
    each prefix was last routed and prices a move off that replica like a copy; it is off by
    default (RouterConfig: in 2 of 5 rounds it froze a placement that overfilled one cache).
"""

from __future__ import annotations

from router_testing import (
    BS,
    FakeClock,
    FakeReplica,
    hashes,
    idle_load,
    make_core,
    prompt,
    removed,
    stored,
)

from kvmesh.replicas.kv.block_pool import BlockPool
from kvmesh.router.routing import RouterConfig

LEGACY = {"eviction_aware": False, "queue_soft_limit": None, "rate_aware": False}
"""The policy before issue #15 (the defaults but for ``rate_aware``; no test above reports a
rate, so there every rate factor is 1 anyway)."""
AWARE = {"eviction_aware": True}


class PooledReplica(FakeReplica):
    """A fake replica whose cache is a real block pool: serving a prompt hits its cached
    prefix, computes and caches the rest, then releases it (tail first), as the engine does."""

    def __init__(self, name: str, clock: FakeClock, num_blocks: int) -> None:
        super().__init__(name, clock)
        self.pool = BlockPool(num_blocks=num_blocks + 1)  # block 0 is the null block
        self.pool.record_events(True)

    def cached_prefix_tokens(self, tokens: list[int]) -> int:
        n = 0
        for h in hashes(tokens):
            if self.pool.get_cached(h) is None:
                break
            n += 1
        return n * BS

    def serve(self, tokens: list[int]) -> int:
        """Run one request to completion; returns the prompt tokens it found cached."""
        hs = hashes(tokens)
        hit = self.cached_prefix_tokens(tokens) // BS
        shared = [self.pool.get_cached(h) for h in hs[:hit]]
        self.pool.touch(shared)
        fresh = self.pool.allocate(len(hs) - hit)
        parent = hs[hit - 1] if hit else None
        for blk, h in zip(fresh, hs[hit:], strict=True):
            self.pool.cache(blk, h, parent, BS)
            parent = h
        self.pool.release(reversed(shared + fresh))
        return hit * BS

    def flush(self, core) -> None:
        core.apply_report(self.name, self.report(self.pool.drain_events()))


def _route(core, tokens, **kw):
    return core.route(hashes(tokens), len(tokens), **kw)


def _full_cache_holding_an_old_prefix(**overrides):
    """Replica "a" (64 blocks) has cached tenant 7's 20-block prefix, then 44 blocks of other
    tenants' work, which evicted everything older: the prefix is intact and reported, but it
    is now the least recently used content. Replica "b" is idle and cold."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    a = PooledReplica("a", clock, num_blocks=64)
    b = FakeReplica("b", clock)
    core.set_replicas(["a", "b"])
    core.apply_report("b", b.report())
    a.serve(prompt(100, 10 * BS))  # oldest: evicted first
    a.flush(core)
    tenant = prompt(7, 20 * BS)
    a.serve(tenant)
    a.flush(core)
    for t in range(4):  # 4 x 11 blocks: the cache fills and starts evicting
        a.serve(prompt(200 + t, 11 * BS))
        a.flush(core)
    assert a.cached_prefix_tokens(tenant) == 20 * BS
    assert core.index.capacity("a") == 64  # learned once it reported evictions
    # 320 prefill tokens (20 blocks) are queued at "a" ahead of anything sent now.
    a.load = idle_load(num_requests_waiting=1, pending_prefill_tokens=20 * BS)
    a.flush(core)
    return core, a, b, tenant


def test_stale_hit_after_eviction_is_not_trusted():
    """The router used to send the tenant's next request to "a" for its 320 'cached' tokens;
    the queued work evicted them first, so it paid a full prefill behind that queue. Now the
    prefix counts as evicted and the request goes to the idle replica."""
    request = prompt(7, 20 * BS, suffix=1)  # the prefix + 20 tokens of its own

    core, a, _, _ = _full_cache_holding_an_old_prefix(**LEGACY)
    old = _route(core, request)
    assert old.best == "a" and old.hit_tokens["a"] == 20 * BS
    core, a, _, _ = _full_cache_holding_an_old_prefix()  # the defaults: as before
    assert _route(core, request).best == "a"

    core, a, _, tenant = _full_cache_holding_an_old_prefix(**AWARE)
    new = _route(core, request)
    assert new.best == "b", new.costs
    assert new.hit_tokens["a"] == 0
    rec = {c.replica: c for c in new.candidates}
    assert rec["a"].reported_hit_tokens == 20 * BS  # the report's view, kept for the log

    # What the old prediction would have found: "a" works off its queue (20 blocks of other
    # tenants' prompts), and the engine's LRU evicts the whole prefix.
    a.serve(prompt(300, 20 * BS))
    assert a.cached_prefix_tokens(tenant) == 0
    assert a.serve(request) == 0  # had the request gone there: a full prefill
    a.flush(core)


def test_recent_or_pinned_prefix_is_still_trusted():
    """The cut is for prefixes the replica is about to evict, not for hot ones: a prefix a
    request of ours is using there (in flight), or one used since the other work, keeps its
    prediction, and so does everything before the replica's first eviction."""
    request = prompt(7, 20 * BS, suffix=1)

    # In flight: one of our requests with the same prefix is queued or running at "a".
    core, a, _, tenant = _full_cache_holding_an_old_prefix(**AWARE)
    d = _route(core, prompt(7, 20 * BS, suffix=2))
    core.on_routed("a", "mine", hashes(prompt(7, 20 * BS, suffix=2)), 20 * BS + 20, d)
    after = _route(core, request)
    assert after.hit_tokens["a"] == 20 * BS
    # Completed: its blocks went to the LRU tail, so the prefix is recent now.
    core.on_completed("mine")
    assert _route(core, request).hit_tokens["a"] == 20 * BS

    # Used again by the replica (its report re-stores nothing, but a hit refreshes the LRU:
    # here, the router saw the tenant's request complete there).
    core, a, _, tenant = _full_cache_holding_an_old_prefix(**AWARE)
    a.serve(tenant)
    a.flush(core)
    core.on_routed("a", "x", hashes(tenant), len(tenant), None)
    core.on_completed("x")
    assert _route(core, request).hit_tokens["a"] == 20 * BS

    # No eviction reported yet: the cache is not full, nothing is cut.
    clock = FakeClock()
    core = make_core(clock, **AWARE)
    a = PooledReplica("a", clock, num_blocks=1000)
    core.set_replicas(["a", "b"])
    a.serve(tenant)
    for t in range(20):
        a.serve(prompt(200 + t, 11 * BS))
    a.load = idle_load(num_requests_waiting=5, pending_prefill_tokens=5000)
    a.flush(core)
    assert core.index.capacity("a") is None
    assert _route(core, request).hit_tokens["a"] == 20 * BS


def test_cut_shrinks_with_the_queue_ahead():
    """Blocks are cut from where the survivors end: the shorter the queue, the more survives."""
    core, a, _, _ = _full_cache_holding_an_old_prefix(**AWARE)
    request = prompt(7, 20 * BS, suffix=1)
    # Age of the prefix: 44 blocks stored since; capacity 64 -> 19 more blocks keep it.
    for queued_blocks, expect in ((0, 20 * BS), (19, 20 * BS), (20, 0), (40, 0)):
        a.load = idle_load(num_requests_waiting=1, pending_prefill_tokens=queued_blocks * BS)
        a.flush(core)
        assert _route(core, request).hit_tokens["a"] == expect, queued_blocks


def _hot_owner(**overrides):
    clock = FakeClock()
    core = make_core(clock, **overrides)
    reps = {n: FakeReplica(n, clock) for n in ("owner", "other")}
    core.set_replicas(reps)
    hot = prompt(1, 2400)  # the popular tenant's 2,400-token system prompt
    core.apply_report("owner", reps["owner"].report(_stored(hot)))
    core.apply_report("other", reps["other"].report(_stored(prompt(2, 1712))))
    return core, reps, hot


def _stored(tokens):
    from router_testing import stored

    return stored(hashes(tokens))


def test_hot_prefix_spreads_past_the_queue_limit_and_returns_when_it_drains():
    """Owner's queue (prefill tokens) over time, as its reports say; the other replica is idle
    and does not hold the hot prefix. Each step routes one request of the hot tenant."""
    timeline = [500, 1500, 3000, 4000, 4600, 2500, 1000]
    picks = {}
    for name, overrides in (
        ("legacy", LEGACY),
        ("default", {}),
        ("limited", {"queue_soft_limit": 2048.0}),
    ):
        core, reps, hot = _hot_owner(**overrides)
        picks[name] = []
        for i, queued in enumerate(timeline):
            reps["owner"].load = idle_load(
                num_requests_running=2, num_requests_waiting=3, pending_prefill_tokens=queued
            )
            core.apply_report("owner", reps["owner"].report())
            d = _route(core, [*hot, *range(60_000 + 100 * i, 60_000 + 100 * i + 100)])
            picks[name].append(d.best)
    # Before: the 2,400 cached tokens beat an idle replica until the owner's queue is ~4,800
    # tokens longer (17 s at the CPU replica's 280 tokens/s).
    assert picks["legacy"] == ["owner"] * len(timeline)
    assert picks["default"] == picks["legacy"]  # the limit is off by default (RouterConfig)
    # With the limit: spreads while the owner's queue is past ~3,400 tokens, comes back after.
    assert picks["limited"] == ["owner", "owner", "owner", "other", "other", "owner", "owner"]


def test_queue_term_is_linear_up_to_the_limit():
    from kvmesh.router.routing.policy import queue_term

    cfg = RouterConfig(queue_soft_limit=2048.0, queue_over_factor=2.0)
    assert queue_term(1000, cfg) == 1000
    assert queue_term(2048, cfg) == 2048
    assert queue_term(3048, cfg) == 2048 + 2 * 1000
    assert queue_term(3048, RouterConfig()) == 3048


# ---- (c) queued tokens at each replica's own prefill rate -----------------------------------
def _two_speeds(rates, queued, **overrides):
    """Replicas "slow" and "fast" (names from the run: f2so ~130 tok/s, ml6k ~170), equally
    many resident requests, ``queued`` prefill tokens each; ``rates`` as their stats report
    them (None: the key is absent, as from an older replica)."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    core.set_replicas(["slow", "fast"])
    for name in ("slow", "fast"):
        rep = FakeReplica(name, clock)
        rep.load = idle_load(
            num_requests_running=4, num_requests_waiting=2, pending_prefill_tokens=queued[name]
        )
        stats = rep.report()
        if rates[name] is not None:
            stats["prefill_tokens_per_s"] = rates[name]
            stats["decode_step_s"] = 0.08
        core.apply_report(name, stats)
    return core


COLD = prompt(9, 400)
"""A new conversation: nothing of it cached anywhere (a 400-token prefill either way)."""
QUEUED = {"slow": 1500, "fast": 1800}
"""Fewer tokens at "slow" (1,500 / 130 = 11.5 s) but more seconds than at "fast" (10.6 s)."""


def test_fewer_queued_tokens_but_more_seconds_loses():
    slow_fast = {"slow": 130.0, "fast": 170.0}
    old = _route(_two_speeds(slow_fast, QUEUED, rate_aware=False), COLD)
    assert old.best == "slow", old.costs  # tokens: 800 + 1,500 < 800 + 1,800
    new = _route(_two_speeds(slow_fast, QUEUED), COLD)  # the default
    assert new.best == "fast", new.costs
    # Seconds: (800 + 1,500) / 130 = 17.7 s at "slow" > (800 + 1,800) / 170 = 15.3 s. The cost
    # stays in tokens at the median rate (150/s); the decode term (24 x 6 resident) is not
    # rate-priced.
    assert abs(new.costs["slow"] - (2300 * 150 / 130 + 24 * 6)) < 1e-6
    assert abs(new.costs["fast"] - (2600 * 150 / 170 + 24 * 6)) < 1e-6
    terms = {c.replica: c for c in new.candidates}
    assert terms["slow"].load.prefill_tokens_per_s == 130.0
    assert terms["fast"].load.decode_step_s == 0.08


def test_equal_or_missing_rates_change_nothing():
    for rates in ({"slow": 150.0, "fast": 150.0}, {"slow": None, "fast": None}):
        old = _route(_two_speeds(rates, QUEUED, rate_aware=False), COLD)
        new = _route(_two_speeds(rates, QUEUED), COLD)
        assert old.best == new.best == "slow"
        assert old.costs == new.costs  # exactly: every factor is 1.0
    # One replica not measured yet: it counts at the other's rate (the median), not at 0.
    core = _two_speeds({"slow": None, "fast": 170.0}, QUEUED)
    unmeasured = _route(_two_speeds({"slow": None, "fast": None}, QUEUED), COLD)
    d = _route(core, COLD)
    assert d.best == "slow" and d.costs == unmeasured.costs
    # A configured default is used instead where given.
    core = _two_speeds({"slow": None, "fast": 170.0}, QUEUED, default_prefill_tokens_per_s=130.0)
    assert _route(core, COLD).best == "fast"


def test_one_odd_rate_cannot_exile_a_replica():
    """An idle replica reporting an absurd 1 token/s still takes work once the other's queue
    is long: its rate is clamped to half the median (``rate_max_ratio`` 2)."""
    rates = {"slow": 1.0, "fast": 170.0}
    queued = {"slow": 0, "fast": 4000}
    d = _route(_two_speeds(rates, queued), COLD)
    assert d.best == "slow", d.costs
    unclamped = _route(_two_speeds(rates, queued, rate_max_ratio=1000.0), COLD)
    assert unclamped.best == "fast"


def test_rates_reach_the_decision_log_and_replay():

    d = _route(_two_speeds({"slow": 130.0, "fast": 170.0}, QUEUED), COLD)
    terms, cands = _logged_and_replayed(d, len(COLD))
    assert terms["slow"].rate_factor > 1.0 > terms["fast"].rate_factor
    assert terms["slow"].prefill_tokens_per_s == 130.0
    assert cands["slow"].load.prefill_tokens_per_s == 130.0


def _logged_and_replayed(decision, num_prompt_tokens):
    """The decision's log terms per replica (checked to add up to its costs), and the
    candidates a replay rebuilds from the record after a JSON round trip."""
    from kvmesh.router.routing.decision_log import DecisionRecord, candidate_terms
    from kvmesh.router.routing.replay import candidates_of

    cfg = RouterConfig(block_size=BS, seed=0)
    terms = {t.replica: t for t in candidate_terms(decision, num_prompt_tokens, cfg)}
    for t in terms.values():
        assert abs(t.cost - decision.costs[t.replica]) < 1e-6
    rec = DecisionRecord(
        0.0, "r", None, num_prompt_tokens, None, list(terms.values()), decision.best, "x"
    )
    rec = DecisionRecord.from_json(rec.as_json())
    return terms, {c.replica: c for c in candidates_of(rec, cfg)}


# ---- (d) the KV penalty for a turn whose blocks the replica already holds ---------------------
LAST_TURN = prompt(5, 1488, suffix=31)
"""The logged turn: 1,488 tokens of a conversation cached on "home", then its new part."""


def _full_home(**overrides):
    """As logged: "home" holds the conversation, runs 5 requests and has every block in use;
    "idle" has nothing cached and nothing running."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    home, idle = FakeReplica("home", clock), FakeReplica("idle", clock)
    core.set_replicas(["home", "idle"])
    home.load = idle_load(num_requests_running=5, kv_cache_usage=1.0)
    core.apply_report("home", home.report(events=stored(hashes(LAST_TURN)[:-2])))
    core.apply_report("idle", idle.report())
    return core


def test_cached_turn_stays_on_its_full_replica():
    old = _route(_full_home(kv_penalty_by_miss=False), LAST_TURN)
    assert old.best == "idle", old.costs  # the logged move: the flat 4,096 outweighs 2 x 1,508
    new = _route(_full_home(), LAST_TURN)  # the default
    assert new.best == "home" and new.reason == "cache_hit", new.costs
    hit = new.hit_tokens["home"]
    assert hit == len(LAST_TURN) - 2 * BS - (len(LAST_TURN) % BS)
    share = (len(LAST_TURN) - hit) / len(LAST_TURN)
    assert abs(new.costs["home"] - (2 * (len(LAST_TURN) - hit) + 24 * 5 + 4096 * share)) < 1e-6


def test_a_cold_prompt_still_avoids_the_full_replica():
    """Nothing of it cached anywhere: it needs as many new blocks on either replica, and the
    full one pays the whole penalty, as before."""
    cold = prompt(8, 1200)
    for by_miss in (True, False):
        d = _route(_full_home(kv_penalty_by_miss=by_miss), cold)
        assert d.best == "idle", d.costs
        assert d.costs["home"] - d.costs["idle"] == 24 * 5 + 4096


# ---- (e) copying a cached prefix into a small cache -------------------------------------------
POPULAR = prompt(0, 1024, suffix=7)
"""A new session of the popular tenant: its 1,024-token system prompt, then its own message."""


def _owner_busy_with_a_cold_prompt(kv_blocks_total, **overrides):
    """As logged at t = 43.5 s: "owner" holds the tenant's prompt and is working off another
    tenant's cold prompt (2,400 prefill tokens still queued, 2 requests resident); "other"
    holds a different tenant and runs one conversation. Both report their cache size."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    owner, other = FakeReplica("owner", clock), FakeReplica("other", clock)
    core.set_replicas(["owner", "other"])
    owner.load = idle_load(
        num_requests_running=1,
        num_requests_waiting=1,
        pending_prefill_tokens=2400,
        kv_blocks_total=kv_blocks_total,
    )
    other.load = idle_load(num_requests_running=1, kv_blocks_total=kv_blocks_total)
    core.apply_report("owner", owner.report(stored(hashes(prompt(0, 1024)))))
    core.apply_report("other", other.report(stored(hashes(prompt(1, 1712)))))
    return core


def test_popular_prefix_is_not_copied_into_a_small_cache_to_dodge_a_queue():
    old = _route(_owner_busy_with_a_cold_prompt(384, copy_penalty=0.0), POPULAR)
    assert old.best == "other", old.costs  # the logged move
    new = _route(_owner_busy_with_a_cold_prompt(384), POPULAR)  # the default
    assert new.best == "owner" and new.reason == "cache_hit", new.costs
    # The 1,024 copied tokens would take a sixth of the other replica's 6,144-token cache (past
    # copy_full_share 0.15): each pays copy_penalty 2 on top of miss_weight 2.
    assert new.costs["other"] - old.costs["other"] == 2 * 1024
    assert new.costs["owner"] == old.costs["owner"]  # the holder copies nothing


def test_the_same_copy_into_a_large_cache_or_an_unreported_one_still_moves():
    """A copy of the same 64 blocks takes 2 % of a 2,900-block cache (the sim's replicas): it
    pays 2 x 1,024 x 0.022 / 0.15 and the request still skips the queue. A replica that does
    not report its size (older version) pays nothing extra."""
    big = _route(_owner_busy_with_a_cold_prompt(2900), POPULAR)
    assert big.best == "other", big.costs
    share = 1024 / (2900 * BS * 0.15)
    legacy = _route(_owner_busy_with_a_cold_prompt(2900, copy_penalty=0.0), POPULAR)
    assert abs(big.costs["other"] - legacy.costs["other"] - 2 * share * 1024) < 1e-6
    unreported = _route(_owner_busy_with_a_cold_prompt(0), POPULAR)
    assert unreported.best == "other"
    legacy = _route(_owner_busy_with_a_cold_prompt(0, copy_penalty=0.0), POPULAR)
    assert unreported.costs == legacy.costs


def test_a_cold_prompt_pays_no_copy_penalty():
    """Nothing of it is cached anywhere: no copy, whatever the cache sizes."""
    cold = prompt(9, 1200)
    for size in (384, 0):
        with_penalty = _route(_owner_busy_with_a_cold_prompt(size), cold)
        without = _route(_owner_busy_with_a_cold_prompt(size, copy_penalty=0.0), cold)
        assert with_penalty.costs == without.costs and with_penalty.best == "other"


def test_cache_size_reaches_the_decision_log_and_replay():
    d = _route(_owner_busy_with_a_cold_prompt(384), POPULAR)
    terms, cands = _logged_and_replayed(d, len(POPULAR))
    assert terms["other"].kv_blocks_total == 384
    assert cands["other"].load.kv_blocks_total == 384


# ---- (f) a cold tenant prompt between two idle replicas ----------------------------------------
COLD_TENANT = prompt(3, 3072, suffix=5)


def _two_idle_tenant_replicas(quiet_rate=280.0, quiet_queued=0, **overrides):
    """As logged: both replicas idle (but for ``quiet_queued`` prefill tokens on "quiet").
    "popular" caches 214 blocks of its tenant's prompt and conversations, "quiet" 153 of
    another tenant's, out of 384 each; popular measured 296 prefill tokens/s."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    popular, quiet = FakeReplica("popular", clock), FakeReplica("quiet", clock)
    core.set_replicas(["popular", "quiet"])
    for rep, rate, cached in (
        (popular, 296.0, prompt(0, 214 * BS)),
        (quiet, quiet_rate, prompt(1, 153 * BS)),
    ):
        queued = quiet_queued if rep is quiet else 0
        rep.load = idle_load(pending_prefill_tokens=queued, kv_blocks_total=384)
        stats = rep.report(stored(hashes(cached)))
        stats["prefill_tokens_per_s"] = rate
        core.apply_report(rep.name, stats)
    return core


def test_a_cold_tenant_goes_to_the_emptier_cache_not_by_rate_noise():
    old = _route(_two_idle_tenant_replicas(fill_weight=0.0), COLD_TENANT)
    assert old.best == "popular", old.costs  # the logged placement: 5 % faster
    new = _route(_two_idle_tenant_replicas(), COLD_TENANT)  # the default
    assert new.best == "quiet" and new.reason == "no_prefix", new.costs
    # Each of the 3,092 missed tokens pays 2 x (214 - 153) / 384 more on the fuller cache.
    extra = 2 * (214 - 153) / 384 * len(COLD_TENANT) * 288 / 296  # at its rate factor
    assert abs(new.costs["popular"] - old.costs["popular"] - extra) < 1e-6
    assert new.costs["quiet"] == old.costs["quiet"]  # the emptiest pays nothing extra


def test_a_real_difference_still_decides_a_cold_prompt():
    """The fill term is a fraction of the miss: a replica 20 % slower, or one with a queued
    prefill ahead, still loses the cold prompt though its cache is emptier."""
    slow = _route(_two_idle_tenant_replicas(quiet_rate=240.0), COLD_TENANT)
    assert slow.best == "popular", slow.costs
    busy = _route(_two_idle_tenant_replicas(quiet_queued=1000), COLD_TENANT)
    assert busy.best == "popular", busy.costs


def test_a_conversation_is_not_pushed_off_a_full_cache():
    """A turn whose prefix the fuller replica holds misses only its new tokens there, so the
    fill term adds little, and nothing to a replica whose size is unknown."""
    turn = prompt(0, 214 * BS, suffix=3)
    d = _route(_two_idle_tenant_replicas(), turn)
    assert d.best == "popular" and d.reason == "cache_hit", d.costs


def test_cached_blocks_reach_the_decision_log_and_replay():
    d = _route(_two_idle_tenant_replicas(), COLD_TENANT)
    terms, cands = _logged_and_replayed(d, len(COLD_TENANT))
    assert terms["popular"].cached_blocks == 214
    assert cands["quiet"].cached_blocks == 153


# ---- (g) a tenant whose prefix every replica evicted ----------------------------------------
EVICTED_TENANT = prompt(3, 3072)


def _tenant_evicted_at_home(home_queued=0, **overrides):
    """ "home" was sent tenant 3's 3,072-token prompt, cached it and then evicted all of it
    (other work); it now caches 250 blocks of tenant 0, "other" 153 blocks of tenant 1 (384
    each): nothing of tenant 3 is cached anywhere, and "home" is the fuller cache."""
    clock = FakeClock()
    core = make_core(clock, **overrides)
    home, other = FakeReplica("home", clock), FakeReplica("other", clock)
    core.set_replicas(["home", "other"])
    for rep in (home, other):
        rep.load = idle_load(kv_blocks_total=384)
        core.apply_report(rep.name, rep.report())
    first = prompt(3, 3072, suffix=1)
    core.on_routed("home", "first", hashes(first), len(first), None)
    core.apply_report("home", home.report(stored(hashes(first))))
    core.on_completed("first")
    home.load = idle_load(pending_prefill_tokens=home_queued, kv_blocks_total=384)
    evicted = removed(hashes(first))
    core.apply_report("home", home.report([*evicted, *stored(hashes(prompt(0, 250 * BS)))]))
    core.apply_report("other", other.report(stored(hashes(prompt(1, 153 * BS)))))
    return core


def test_a_tenant_evicted_everywhere_goes_back_to_its_replica():
    request = prompt(3, 3072, suffix=2)
    old = _route(_tenant_evicted_at_home(), request)  # the default
    assert old.hit_tokens == {"home": 0, "other": 0}
    assert old.best == "other", old.costs  # the emptier cache: the tenant splits
    new = _route(_tenant_evicted_at_home(prefix_home=True), request)
    assert new.best == "home", new.costs
    assert new.hit_tokens == {"home": 0, "other": 0}  # still a full prefill either way
    cands = {c.replica: c for c in new.candidates}
    assert cands["home"].home_tokens == 3072 and cands["other"].home_tokens == 0
    # Moving it copies the tenant's 3,072 remembered tokens into half of other's cache: each
    # pays copy_penalty 2; home pays nothing more than before.
    assert abs(new.costs["other"] - old.costs["other"] - 2 * 3072) < 1e-6
    assert new.costs["home"] == old.costs["home"]


def test_a_home_is_not_a_pin():
    """A home far busier than the cost of a copy still loses the request; the move then
    becomes the tenant's new home."""
    request = prompt(3, 3072, suffix=2)
    core = _tenant_evicted_at_home(home_queued=9000, prefix_home=True)
    d = _route(core, request)
    assert d.best == "other", d.costs
    core.on_routed("other", "moved", hashes(request), len(request), d)
    again = _route(core, prompt(3, 3072, suffix=3))
    cands = {c.replica: c for c in again.candidates}
    assert cands["other"].home_tokens == 3072 and cands["home"].home_tokens == 0


def test_home_tokens_reach_the_decision_log_and_replay():
    """Logged per candidate; a replay prices them only where its settings turn homes on."""
    from kvmesh.router.routing.decision_log import DecisionRecord, candidate_terms
    from kvmesh.router.routing.replay import candidates_of

    request = prompt(3, 3072, suffix=2)
    cfg = RouterConfig(block_size=BS, seed=0, prefix_home=True)
    d = _route(_tenant_evicted_at_home(prefix_home=True), request)
    terms = {t.replica: t for t in candidate_terms(d, len(request), cfg)}
    assert terms["home"].home_tokens == 3072
    assert abs(terms["other"].cost - d.costs["other"]) < 1e-6
    rec = DecisionRecord(0.0, "r", None, len(request), None, list(terms.values()), d.best, "x")
    rec = DecisionRecord.from_json(rec.as_json())
    on = {c.replica: c for c in candidates_of(rec, cfg)}
    assert on["home"].home_tokens == 3072
    off = candidates_of(rec, RouterConfig(block_size=BS))
    assert all(c.home_tokens == 0 for c in off)
