"""The decision log on the real app: the tiny model's two replicas behind the prefix-aware
router log every routed request (candidates, cost terms, choice) with the outcome the ingress
saw, and the replay tool reads the log back."""

from __future__ import annotations

import time

import pytest

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.decision_log import read
from kvmesh.router.routing.replay import replay

pytestmark = pytest.mark.slow


def test_routed_requests_are_logged_with_their_outcome(serve_app):
    prefix = " ".join(f"w{i}" for i in range(120))  # several blocks shared by every request
    sent = {}
    with serve_app.client() as c:
        for i in range(6):
            body = {"model": "tiny", "prompt": f"{prefix} question {i}", "max_tokens": 3}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            # Logged per prompt: <x-kvmesh-request-id>-<index of the prompt in the request>.
            sent[r.headers["x-kvmesh-request-id"] + "-0"] = r.headers["x-kvmesh-replica"]

    deadline = time.monotonic() + 10
    while True:
        logged = {}
        if serve_app.decision_log.exists():
            logged = {d.request_id: d for d in read(serve_app.decision_log)}
        if set(sent) <= set(logged):
            break
        assert time.monotonic() < deadline, f"logged {len(logged)} of {len(sent)}"
        time.sleep(0.2)

    later_hits = []
    for rid, replica_header in sent.items():
        d = logged[rid]
        replica = replica_header.split("#", 1)[1]
        assert len(d.candidates) == 2 and d.best in {c.replica for c in d.candidates}
        for c in d.candidates:
            assert c.cost == pytest.approx(c.miss_cost + c.queue_cost + c.decode_cost + c.kv_cost)
        assert d.chosen == replica and d.outcome["replica"] == replica
        assert d.num_prompt_tokens > 100 and d.reason
        assert 0 < d.outcome["ttft_s"] < 30 and d.outcome["replica_ttft_s"] >= 0
        later_hits.append(d.outcome["cached_tokens"])
    # After the first request, the shared prefix is found cached where the router sent them.
    assert all(h >= 100 for h in later_hits[1:]), later_hits

    summary = replay([logged[r] for r in sent], RouterConfig(block_size=16, model_name="tiny"))
    assert summary["decisions"] == len(sent)
