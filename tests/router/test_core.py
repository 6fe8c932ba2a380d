"""The routing core on synthetic replica states (no Ray)."""

from __future__ import annotations

from collections import Counter

import pytest
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

from kvmesh.router.routing import Reason, RouterConfig


def _route(core, tokens, **kw):
    return core.route(hashes(tokens), len(tokens), **kw)


def _setup(names=("a", "b", "c"), clock=None, **overrides):
    clock = clock or FakeClock()
    core = make_core(clock, **overrides)
    reps = {n: FakeReplica(n, clock) for n in names}
    core.set_replicas(reps)
    for n, rep in reps.items():
        core.apply_report(n, rep.report())
    return core, reps


def test_longest_cached_prefix_wins_when_load_is_even():
    core, reps = _setup()
    p = prompt(1, 640, suffix=9)
    h = hashes(p)
    core.apply_report("a", reps["a"].report(stored(h[:10])))
    core.apply_report("b", reps["b"].report(stored(h[:30])))
    d = _route(core, p)
    assert d.best == "b"
    assert d.reason is Reason.CACHE_HIT
    assert d.hit_tokens == {"a": 10 * BS, "b": 30 * BS, "c": 0}
    assert d.ranked == ["b", "a", "c"]


def test_fully_cached_prompt_still_computes_one_token():
    core, reps = _setup()
    p = prompt(1, 320)  # exactly 20 blocks
    core.apply_report("a", reps["a"].report(stored(hashes(p))))
    assert _route(core, p).hit_tokens["a"] == 320 - 1


def test_overloaded_replica_loses_to_cold_one():
    core, reps = _setup(names=("hot", "cold"))
    p = prompt(2, 1024, suffix=3)
    core.apply_report("hot", reps["hot"].report(stored(hashes(p))))
    # Even: the cache decides.
    assert _route(core, p).best == "hot"
    # 6000 prefill tokens queued at "hot": recomputing 1k tokens elsewhere is cheaper.
    reps["hot"].load = idle_load(num_requests_waiting=6, pending_prefill_tokens=6000)
    core.apply_report("hot", reps["hot"].report())
    d = _route(core, p)
    assert d.best == "cold" and d.reason is Reason.NO_PREFIX
    # A small queue is worth waiting behind.
    reps["hot"].load = idle_load(num_requests_waiting=1, pending_prefill_tokens=200)
    core.apply_report("hot", reps["hot"].report())
    assert _route(core, p).best == "hot"


def test_kv_pressure_is_penalised():
    core, reps = _setup(names=("full", "free"))
    p = prompt(3, 160, suffix=1)
    core.apply_report("full", reps["full"].report(stored(hashes(p)[:5])))
    assert _route(core, p).best == "full"
    reps["full"].load = idle_load(kv_cache_usage=0.99)
    core.apply_report("full", reps["full"].report())
    assert _route(core, p).best == "free"


def test_ties_are_broken_at_random_and_rank_everyone():
    core, _ = _setup(names=("a", "b", "c", "d"))
    p = prompt(4, 64)
    winners = Counter()
    for _ in range(200):
        d = _route(core, p)
        assert sorted(d.ranked) == ["a", "b", "c", "d"]
        assert d.reason is Reason.NO_PREFIX
        winners[d.best] += 1
    assert set(winners) == {"a", "b", "c", "d"}
    assert min(winners.values()) > 20


def test_equal_prefix_ties_prefer_lighter_load():
    core, reps = _setup(names=("a", "b"))
    p = prompt(5, 320, suffix=2)
    for n in "ab":
        core.apply_report(n, reps[n].report(stored(hashes(p))))
    reps["a"].load = idle_load(num_requests_running=0)
    reps["b"].load = idle_load(num_requests_running=0)
    # A difference below tie_tolerance in cost but still a lower load: the lighter one wins.
    core2 = make_core(tie_tolerance=100.0)
    core2.set_replicas(["a", "b"])
    reps["a"].load = idle_load(num_requests_running=2)
    for n in "ab":
        core2.apply_report(n, reps[n].report(snapshot_fn=lambda n=n: hashes(p)))
    for _ in range(20):
        assert _route(core2, p).best == "b"


def test_reported_eviction_removes_the_entry():
    core, reps = _setup(names=("a", "b"))
    p = prompt(6, 480, suffix=4)
    h = hashes(p)
    core.apply_report("a", reps["a"].report(stored(h)))
    assert _route(core, p).best == "a"
    # The replica evicts the tail of the prefix (what an LRU does first).
    core.apply_report("a", reps["a"].report(removed(h[10:])))
    d = _route(core, p)
    assert d.hit_tokens["a"] == 10 * BS
    core.apply_report("a", reps["a"].report(removed(h[:10])))
    assert core.index.num_confirmed("a") == 0
    assert _route(core, p).hit_tokens["a"] == 0


def test_events_from_a_real_block_pool_mirror_its_cache():
    from kvmesh.replicas.kv.block_pool import BlockPool

    pool = BlockPool(num_blocks=9)  # 8 usable blocks
    pool.record_events(True)  # as a replica does once a cache reporter drains them
    core, reps = _setup(names=("a",))
    ps = [prompt(t, 4 * BS) for t in range(4)]
    for p in ps:  # each prompt: 4 blocks computed, cached, then freed (LRU keeps them)
        blocks = pool.allocate(4)
        parent = None
        for blk, h in zip(blocks, hashes(p), strict=True):
            pool.cache(blk, h, parent, BS)
            parent = h
        pool.release(reversed(blocks))
        core.apply_report("a", reps["a"].report(pool.drain_events()))
        truth = {h[:8] for h in pool.cached_hashes()}
        assert core.index.confirmed_keys("a") == truth
    # Only the two newest prompts survived eviction, and the router knows it.
    assert _route(core, ps[0]).hit_tokens["a"] == 0
    assert _route(core, ps[3]).hit_tokens["a"] == 4 * BS - 1


def test_dead_replica_is_forgotten_and_new_replica_gets_traffic():
    core, reps = _setup(names=("a", "b"))
    p = prompt(7, 320, suffix=5)
    core.apply_report("a", reps["a"].report(stored(hashes(p))))
    assert _route(core, p).best == "a"
    core.remove_replica("a")
    d = _route(core, p)
    assert d.ranked == ["b"] and d.hit_tokens == {"b": 0}
    assert "a" not in core.index
    # A replica that just joined (no report yet) is idle and cold: it takes cold traffic
    # while the old one is busy.
    reps["b"].load = idle_load(num_requests_running=8, pending_prefill_tokens=2000)
    core.apply_report("b", reps["b"].report())
    core.set_replicas(["b", "new"])
    assert _route(core, prompt(8, 320)).best == "new"
    # Candidates Serve passes that we never heard of are added on the fly.
    assert set(core.route([], 10, candidates=["b", "new", "newer"]).ranked) == {
        "b",
        "new",
        "newer",
    }


def test_dead_replica_slot_is_reused_without_leaking_entries():
    core, reps = _setup(names=("a", "b"))
    p = prompt(9, 160)
    core.apply_report("a", reps["a"].report(stored(hashes(p))))
    core.remove_replica("a")
    core.add_replica("c")  # takes a's bitmask slot
    assert _route(core, p).hit_tokens == {"b": 0, "c": 0}


def test_speculative_entries_follow_routing_then_expire_unless_confirmed():
    clock = FakeClock()
    core, reps = _setup(names=("a", "b"), clock=clock, speculative_ttl_s=10.0)
    p1 = prompt(10, 480, suffix=1)
    d = _route(core, p1)
    first = d.best
    core.on_routed(first, "req-1", hashes(p1), len(p1), d)
    # The next turn of the conversation follows at once, before any report.
    p2 = p1 + list(range(1, 60))
    d2 = _route(core, p2)
    assert d2.best == first and d2.reason is Reason.CACHE_HIT
    # Unconfirmed: gone after the TTL.
    clock.t += 11
    assert _route(core, p2).hit_tokens[first] == 0
    # Confirmed by a report: stays, and is no longer a guess (the replica's cached blocks,
    # which price a miss there, count it once).
    core.on_routed(first, "req-2", hashes(p2), len(p2), d2)
    assert core.index.num_speculative(first) == len(p2) // BS
    core.apply_report(first, reps[first].report(stored(hashes(p2))))
    assert core.index.num_speculative(first) == 0
    cands = {c.replica: c for c in _route(core, p2).candidates}
    assert cands[first].cached_blocks == len(p2) // BS
    clock.t += 100
    assert _route(core, p2).hit_tokens[first] == (len(p2) // BS) * BS


def test_speculative_entry_dropped_by_reported_removal():
    clock = FakeClock()
    core, reps = _setup(names=("a", "b"), clock=clock)
    p = prompt(11, 320)
    core.on_routed("a", "x", hashes(p), len(p), None)
    assert _route(core, p).hit_tokens["a"] > 0
    core.apply_report("a", reps["a"].report(removed(hashes(p)[:1])))
    assert _route(core, p).hit_tokens["a"] == 0


def test_own_unacknowledged_requests_count_as_load_until_acked():
    clock = FakeClock()
    core, reps = _setup(names=("a", "b"), clock=clock)
    p = prompt(12, 800, suffix=1)
    d = _route(core, p)
    seq = core.next_seq()
    core.on_routed(d.best, "q1", hashes(p), len(p), d, seq)
    other = "b" if d.best == "a" else "a"
    # A cold request for another tenant avoids the replica that is now busy with ours.
    assert _route(core, prompt(13, 800)).best == other
    assert core.loads.load(d.best, clock()).queued_tokens == len(p)

    class Req:
        router_id, router_seq = "r1", seq

    reps[d.best].reporter.on_request(Req())
    reps[d.best].load = idle_load(num_requests_waiting=1, pending_prefill_tokens=len(p))
    core.apply_report(d.best, reps[d.best].report())
    # Now the report carries it; it is not counted twice.
    assert core.loads.load(d.best, clock()).queued_tokens == len(p)
    assert core.loads.num_pending(d.best) == 0


def test_burst_decided_before_any_confirmation_sees_its_own_reservations():
    """Serve may ask for many decisions before confirming one: each reserved decision
    counts as load and cache at once, so a burst on one cached prefix fills its replica
    first and then spills; a request that lands elsewhere moves its load there."""
    clock = FakeClock()
    core, reps = _setup(names=("home", "other"), clock=clock)
    prefix = prompt(14, 64)
    core.apply_report("home", reps["home"].report(stored(hashes(prefix))))
    chosen = []
    for i in range(12):
        p = [*prefix, 50000 + i]
        d = _route(core, p)
        core.reserve(d.best, f"q{i}", hashes(p), len(p), d, core.next_seq())
        chosen.append(d.best)
    assert chosen[0] == "home" and "other" in chosen, chosen
    assert chosen.count("home") > chosen.count("other"), chosen
    # Without reservations every one of them would have gone home.
    first_other = chosen.index("other")
    assert all(r == "home" for r in chosen[:first_other])

    # q0 was reserved at home but Serve sent it to the other replica: its load moves.
    before_home = core.loads.num_pending("home")
    d0 = _route(core, [*prefix, 50000])
    core.on_routed("other", "q0", hashes([*prefix, 50000]), 65, d0, 1, reserved="home")
    assert core.loads.num_pending("home") == before_home - 1


def test_unacknowledged_load_falls_back_to_ttl_and_completion():
    clock = FakeClock()
    core, _ = _setup(names=("a",), clock=clock, pending_ttl_s=5.0)
    core.on_routed("a", "q1", [], 300, None)
    core.on_routed("a", "q2", [], 200, None)
    assert core.loads.load("a", clock()).queued_tokens == 500
    core.on_completed("q1")
    assert core.loads.load("a", clock()).queued_tokens == 200
    clock.t += 6
    assert core.loads.load("a", clock()).queued_tokens == 0


def test_imbalance_guard_falls_back_to_power_of_two():
    # Cache prediction says "a", but "a" is drowning: the guard overrides the cost.
    core, reps = _setup(
        names=("a", "b", "c"), miss_weight=100.0, balance_abs=1000.0, balance_rel=2.0
    )
    p = prompt(14, 640, suffix=2)
    core.apply_report("a", reps["a"].report(stored(hashes(p))))
    reps["a"].load = idle_load(num_requests_waiting=20, pending_prefill_tokens=20_000)
    reps["b"].load = idle_load(num_requests_running=1)
    core.apply_report("a", reps["a"].report())
    core.apply_report("b", reps["b"].report())
    picks = Counter()
    for _ in range(100):
        d = _route(core, p)
        assert d.reason is Reason.LOAD_FALLBACK
        picks[d.best] += 1
    assert "a" not in picks and set(picks) == {"b", "c"}
    # Without the skew the cache wins again.
    reps["a"].load = idle_load(num_requests_running=1)
    core.apply_report("a", reps["a"].report())
    assert _route(core, p).reason is Reason.CACHE_HIT


def test_session_affinity_keeps_a_session_unless_much_costlier():
    core, reps = _setup(names=("a", "b"), session_slack=1000.0)
    p = prompt(15, 64)
    d = _route(core, p, session_id="s1")
    core.on_routed(d.best, "r", [], len(p), d, session_id="s1")
    other = "b" if d.best == "a" else "a"
    # The other replica holds 400 tokens of the next prompt (cost gap ~700 < slack): the
    # session stays.
    q = prompt(16, 2400, suffix=1)
    core.apply_report(other, reps[other].report(stored(hashes(q)[:25])))
    d2 = _route(core, q, session_id="s1")
    assert d2.best == d.best and d2.reason is Reason.SESSION_AFFINITY
    # Without the session the cache wins.
    assert _route(core, q).best == other
    # Far more of the prompt cached elsewhere (gap > slack): the session moves.
    core.apply_report(other, reps[other].report(stored(hashes(q))))
    d3 = _route(core, q, session_id="s1")
    assert d3.best == other and d3.reason is Reason.CACHE_HIT
    # A dead replica releases its sessions.
    core.on_routed(d.best, "r2", [], len(p), d, session_id="s2")
    core.remove_replica(d.best)
    assert _route(core, p, session_id="s2").ranked == [other]
    assert core._sticky("s2", 0.0) is None


def test_router_config_is_strict():
    with pytest.raises(ValueError):
        RouterConfig(miss_wieght=2.0)
    with pytest.raises(ValueError):
        RouterConfig(block_size="16")
    with pytest.raises(ValueError):
        RouterConfig(balance_rel=0.5)


def test_metrics_count_decisions_by_reason_and_hits():
    from prometheus_client import REGISTRY

    from kvmesh.router.routing import PrefixRouterCore
    from kvmesh.router.routing.metrics import RouterMetrics

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"model_name": "metrics-test", **labels}) or 0.0

    core = PrefixRouterCore(
        RouterConfig(block_size=BS, seed=0, model_name="metrics-test"),
        metrics=RouterMetrics("metrics-test"),
    )
    reps = {n: FakeReplica(n) for n in "ab"}
    core.set_replicas(reps)
    p = prompt(20, 320, suffix=1)
    core.apply_report("a", reps["a"].report(stored(hashes(p))))
    d = _route(core, p)
    core.on_routed(d.best, "m1", hashes(p), len(p), d)
    cold = prompt(21, 64)
    d2 = _route(core, cold)
    core.on_routed(d2.best, "m2", hashes(cold), len(cold), d2)
    assert value("kvmesh:router_decisions_total", reason="cache_hit") == 1
    assert value("kvmesh:router_decisions_total", reason="no_prefix") == 1
    assert value("kvmesh:router_prompt_tokens_total") == len(p) + len(cold)
    assert value("kvmesh:router_predicted_hit_tokens_total") == len(p) // BS * BS
    # Replicas' own counters arrive as deltas between reports.
    reps["a"].load = idle_load(prefix_cache_queries=1000, prefix_cache_hits=600)
    core.apply_report("a", reps["a"].report())
    reps["a"].load = idle_load(prefix_cache_queries=1500, prefix_cache_hits=900)
    core.apply_report("a", reps["a"].report())
    assert value("kvmesh:router_reported_query_tokens_total") == 500
    assert value("kvmesh:router_reported_hit_tokens_total") == 300
