"""Decision logs and their replay, without Ray (the real run is in tests/serving)."""

from __future__ import annotations

import json

import pytest

from kvmesh.replicas.block_hash import hash_block_tokens
from kvmesh.router.routing import decision_log
from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.core import PrefixRouterCore
from kvmesh.router.routing.decision_log import DecisionLog, candidate_terms, read
from kvmesh.router.routing.load import ReplicaLoad
from kvmesh.router.routing.policy import Candidate, decide
from kvmesh.router.routing.replay import main as replay_main
from kvmesh.router.routing.replay import replay

BS = 16


def _hashes(tenant: int, n: int) -> list[bytes]:
    return hash_block_tokens([tenant * 100 + i for i in range(n)], BS, ("m",))


def test_logged_terms_add_up_to_what_the_policy_ranked():
    config = RouterConfig(block_size=BS, seed=0)
    core = PrefixRouterCore(config)
    core.set_replicas(["a", "b", "c"])
    first = core.route(_hashes(1, 512), 512)
    core.on_routed(first.best, "r1", _hashes(1, 512), 512, first)
    decision = core.route(_hashes(1, 512 + 64), 512 + 64)
    terms = {t.replica: t for t in candidate_terms(decision, 512 + 64, config)}
    assert set(terms) == {"a", "b", "c"}
    for replica, t in terms.items():
        assert t.cost == pytest.approx(decision.costs[replica])
        assert t.cost == pytest.approx(t.miss_cost + t.queue_cost + t.decode_cost + t.kv_cost)
    owner = terms[first.best]
    assert owner.hit_tokens > 0  # the first request's blocks are expected there
    assert owner.queued_tokens > 0  # the first request's prefill is counted there


def _record(log: DecisionLog, request_id: str, cands: list[Candidate], n: int, config):
    import random

    decision = decide(n, cands, config, random.Random(0))
    log.record(request_id, decision, n, session_id="s")
    return decision


def test_log_keeps_records_writes_lines_and_evicts_the_unanswered(tmp_path):
    config = RouterConfig(block_size=BS)
    path = tmp_path / "d.jsonl"
    log = DecisionLog(config, max_records=2, path=path)
    cands = [Candidate("a", 0, ReplicaLoad()), Candidate("b", 0, ReplicaLoad(10, 1, 0.1))]
    _record(log, "r1", cands, 100, config)
    log.set_chosen("r1", "b")
    log.complete("r1", replica="b", cached_tokens=0, ttft_s=0.25)
    (done,) = read(path)
    assert done.request_id == "r1" and done.chosen == "b" and done.session_id == "s"
    assert done.outcome == {"replica": "b", "cached_tokens": 0, "ttft_s": 0.25}
    assert {c.replica for c in done.candidates} == {"a", "b"}
    # Three more, never answered: the oldest is written out without an outcome.
    for i in range(2, 5):
        _record(log, f"r{i}", cands, 100, config)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["r1", "r2"] and lines[1]["outcome"] is None
    assert [r.request_id for r in log.records()] == ["r1", "r2", "r3", "r4"]


def test_logging_is_off_by_default_and_outcomes_then_cost_nothing():
    assert decision_log.open_log(RouterConfig(model_name="nobody")) is None
    decision_log.report_outcome("nobody", "r1", replica="x")  # no log: nothing happens
    assert decision_log.get("nobody") is None


def test_replay_finds_the_decisions_other_settings_would_change(tmp_path, capsys):
    """A replica holding the prompt but with a long queue loses under the default weights;
    replayed with the load terms off, those decisions move back to the cache holder."""
    config = RouterConfig(block_size=BS)
    path = tmp_path / "d.jsonl"
    log = DecisionLog(config, path=path)
    holder = Candidate("holder", 960, ReplicaLoad(queued_tokens=200_000, resident=40))
    idle = Candidate("idle", 0, ReplicaLoad())
    for i in range(5):
        d = _record(log, f"r{i}", [holder, idle], 1024, config)
        assert d.best == "idle"
        log.complete(f"r{i}", replica="idle", ttft_s=1.0 + i)
    records = read(path)
    same = replay(records, config)
    assert same["decisions"] == 5 and same["changed"] == 0
    cache_only = RouterConfig(
        block_size=BS, queue_weight=0.0, decode_weight=0.0, balance_abs=1e12, balance_rel=1e6
    )
    moved = replay(records, cache_only)
    assert moved["changed"] == 5
    change = moved["changes"][0]
    assert (change["old"], change["new"]) == ("idle", "holder")
    assert change["new_hit_tokens"] == 960 and change["old_hit_tokens"] == 0
    assert change["old_outcome"]["ttft_s"] == 1.0
    assert moved["predicted_hit_tokens"] == {"logged": 0, "replayed": 5 * 960}
    # The command line does the same.
    replay_main(
        [
            str(path),
            "--set",
            "queue_weight=0",
            "--set",
            "decode_weight=0",
            "--set",
            "balance_abs=1e12",
            "--set",
            "balance_rel=1e6",
        ]
    )
    assert json.loads(capsys.readouterr().out)["changed"] == 5
