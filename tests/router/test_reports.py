"""The replica → router report: ring, snapshots, resync, convergence of independent routers."""

from __future__ import annotations

import pickle
import random

from router_testing import BS, FakeClock, FakeReplica, hashes, make_core, prompt, removed, stored

from kvmesh.router.routing import CacheReporter, ReporterConfig, parse_report
from kvmesh.router.routing.wire import PAYLOAD_KEY


def test_payload_is_small_picklable_and_parses():
    rep = CacheReporter(block_size=BS, epoch="e")
    h = hashes(prompt(1, 320))
    stats = rep.report(events=stored(h), load={"num_requests_running": 2, "junk": "x"})
    assert set(stats) == {PAYLOAD_KEY}
    report = parse_report(pickle.loads(pickle.dumps(stats)))
    assert report is not None
    assert report.seq == 20 and report.ev_first == 1 and report.has_snapshot
    assert report.load.num_requests_running == 2
    # 20 events + a 20-block snapshot: 9 + 8 bytes a block, plus a few hundred of framing.
    assert len(pickle.dumps(stats)) < 20 * 17 + 600


def test_malformed_reports_are_ignored():
    core = make_core()
    core.add_replica("a")
    assert parse_report(None) is None
    assert parse_report({"other": 1}) is None
    good = CacheReporter(epoch="e").report(events=stored(hashes(prompt(1, 64))))
    bad = {PAYLOAD_KEY: {**good[PAYLOAD_KEY], "ev_keys": b"short"}}
    assert parse_report(bad) is None
    assert parse_report({PAYLOAD_KEY: {**good[PAYLOAD_KEY], "v": 99}}) is None
    assert core.apply_report("a", bad) is False
    assert core.apply_report("a", good) is True


def test_ring_keeps_recent_reports_only():
    clock = FakeClock()
    rep = CacheReporter(ReporterConfig(ring_reports=2), clock=clock, epoch="e")
    h = hashes(prompt(2, 160))
    rep.report(events=stored(h[:4]))
    rep.report(events=stored(h[4:6]))
    r3 = parse_report(rep.report(events=stored(h[6:7])))
    assert r3.seq == 7 and r3.ev_first == 5 and not r3.has_snapshot
    # Idle reports age the events out, so an idle replica's payload stops changing.
    rep.report()
    r5 = parse_report(rep.report())
    assert r5.ev_first == 8 and r5.ev_ops == b""


def test_ring_cap_and_snapshot_cap():
    cfg = ReporterConfig(ring_max_events=5, max_snapshot_blocks=3)
    rep = CacheReporter(cfg, epoch="e")
    h = hashes(prompt(3, 160))  # 10 blocks
    r = parse_report(rep.report(events=stored(h)))
    assert r.ev_first == 6 and len(r.ev_ops) == 5
    assert not r.snap_full and r.snap_keys == b"".join(x[:8] for x in h[-3:])


def test_router_catches_up_from_the_ring_after_missing_broadcasts():
    replica = FakeReplica("a")
    core = make_core()
    core.add_replica("a")
    h = hashes(prompt(4, 320))
    core.apply_report("a", replica.report(stored(h[:5])))
    replica.report(stored(h[5:10]))  # this broadcast never reached the router
    core.apply_report("a", replica.report(removed(h[:2])))
    assert core.is_synced("a")
    assert core.index.confirmed_keys("a") == {x[:8] for x in h[2:10]}


def test_resync_from_snapshot_after_missing_too_many_events():
    clock = FakeClock()
    replica = FakeReplica("a", clock)
    replica.reporter = CacheReporter(
        ReporterConfig(ring_reports=1, snapshot_interval_s=10.0), clock=clock, epoch="a"
    )
    core = make_core(clock)
    core.add_replica("a")
    h = hashes(prompt(5, 480))
    core.apply_report("a", replica.report(stored(h[:10])))
    replica.report(removed(h[:10]))  # missed: the router still believes h[:10]
    core.apply_report("a", replica.report(stored(h[10:20])))
    assert not core.is_synced("a")  # it knows it missed something
    assert len(core.index.confirmed_keys("a")) == 20  # stale entries still there
    clock.t += 11  # snapshot due
    core.apply_report("a", replica.report(stored(h[20:22])))
    assert core.is_synced("a")
    assert core.index.confirmed_keys("a") == {x[:8] for x in h[10:22]}


def test_snapshot_fn_corrects_a_reporter_that_missed_events():
    clock = FakeClock()
    rep = CacheReporter(ReporterConfig(snapshot_interval_s=1.0), clock=clock, epoch="e")
    h = hashes(prompt(6, 160))
    rep.report(events=stored(h[:4]))
    clock.t += 2
    # Someone else drained the engine's events: only the snapshot knows about h[4:8].
    r = parse_report(rep.report(snapshot_fn=lambda: h[:8]))
    assert set(r.snap_keys[i : i + 8] for i in range(0, len(r.snap_keys), 8)) == {
        x[:8] for x in h[:8]
    }


def test_replica_restart_resets_its_entries():
    core = make_core()
    core.add_replica("a")
    h = hashes(prompt(7, 320))
    core.apply_report("a", FakeReplica("a").report(stored(h)))
    fresh = CacheReporter(block_size=BS, epoch="a-restarted")
    core.apply_report("a", fresh.report(events=stored(h[:3])))
    assert core.index.confirmed_keys("a") == {x[:8] for x in h[:3]}
    # Restarted again, and this router missed the first (snapshot-bearing) report: the new
    # epoch alone must wipe what it knew of the old cache, though event numbers went down.
    # The ring still reaches back to event 1, so the router is in sync without a snapshot.
    again = CacheReporter(block_size=BS, epoch="a-again")
    again.report(events=stored(h[5:8]))
    core.apply_report("a", again.report(events=removed(h[5:6])))
    assert core.index.confirmed_keys("a") == {x[:8] for x in h[6:8]}
    assert core.is_synced("a")


def test_independent_routers_converge_from_the_same_reports():
    """Three routers see different subsets of one replica's broadcasts (long-poll coalescing,
    a router that started late) and route their own different traffic; once the same
    snapshot-bearing report reaches them all, their confirmed entries are identical and equal
    to the replica's cache."""
    clock = FakeClock()
    rng = random.Random(0)
    names = ["a", "b"]
    reps = {n: FakeReplica(n, clock) for n in names}
    for n in names:
        reps[n].reporter = CacheReporter(
            ReporterConfig(ring_reports=2, snapshot_interval_s=30.0), clock=clock, epoch=n
        )
    cores = [make_core(clock) for _ in range(3)]
    for c in cores:
        c.set_replicas(names)
    truth = {n: set() for n in names}
    prompts = [hashes(prompt(t, 320)) for t in range(12)]
    for step in range(60):
        clock.t += 1
        for n in names:
            events = []
            for _ in range(rng.randint(0, 3)):
                h = rng.choice(prompts)[: rng.randint(1, 20)]
                if rng.random() < 0.6:
                    events += stored(h)
                    truth[n].update(x[:8] for x in h)
                else:
                    events += removed(h)
                    truth[n].difference_update(x[:8] for x in h)
            stats = reps[n].report(events)
            for i, c in enumerate(cores):
                late = i == 2 and step < 20
                if not late and rng.random() < (1.0 if i == 0 else 0.5):
                    c.apply_report(n, stats)
        for c in cores:  # each routes its own traffic: speculation must not leak into reports
            p = prompt(rng.randrange(12), 320)
            d = c.route(hashes(p), len(p))
            c.on_routed(d.best, f"{id(c)}-{step}", hashes(p), len(p), d)
    # The next snapshot-bearing report reaches everyone.
    clock.t += 31
    for n in names:
        stats = reps[n].report()
        for c in cores:
            c.apply_report(n, stats)
    for n in names:
        views = [c.index.confirmed_keys(n) for c in cores]
        assert views[0] == views[1] == views[2] == truth[n]
        assert all(c.is_synced(n) for c in cores)


def test_snapshot_fn_failure_keeps_the_event_mirror():
    rep = CacheReporter(epoch="e")
    h = hashes(prompt(8, 64))

    def racing():
        raise RuntimeError("Set changed size during iteration")

    r = parse_report(rep.report(events=stored(h), snapshot_fn=racing))
    assert r.has_snapshot and r.snap_keys == b"".join(x[:8] for x in h)
