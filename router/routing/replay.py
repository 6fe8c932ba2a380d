"""Replay a decision log under other router settings: which decisions change, at what cost.

    python -m kvmesh.router.routing.replay decisions.jsonl --set queue_weight=0.5 \\
        --set balance_rel=3

Each logged decision is decided again by the same policy (``policy.decide``) from what the
router saw then (each candidate's predicted cached tokens and load), with the settings given.
This is a *static* replay: it answers "with these settings, where would this request have gone
given the same view", not how the later views would have differed (for that, run
``bench/router_sim.py``). For every decision that changes it reports the old and new replica,
their predicted cached tokens and costs (under the new settings), and what the old choice
actually got (the logged outcome), so a suspicion such as "load terms moved conversations off
the replica holding their prefix" can be checked against a real run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.decision_log import DecisionRecord, read
from kvmesh.router.routing.load import ReplicaLoad
from kvmesh.router.routing.policy import Candidate, decide


def candidates_of(record: DecisionRecord, config: RouterConfig | None = None) -> list[Candidate]:
    """What was ranked. The eviction cut (``eviction_aware``) needs the index's LRU state, which
    the log does not hold: a replay keeps the logged (cut) hits, or with ``eviction_aware``
    off takes the index's uncut match where the log has it."""
    uncut = config is not None and not config.eviction_aware
    return [
        Candidate(
            c.replica,
            c.reported_hit_tokens if uncut and c.reported_hit_tokens is not None else c.hit_tokens,
            ReplicaLoad(
                c.queued_tokens,
                c.resident,
                c.kv_usage,
                c.prefill_tokens_per_s,
                c.decode_step_s,
                c.kv_blocks_total,
            ),
            cached_blocks=c.cached_blocks,
            home_tokens=c.home_tokens if config is None or config.prefix_home else 0,
        )
        for c in record.candidates
    ]


def replay(records: Iterable[DecisionRecord], config: RouterConfig) -> dict[str, Any]:
    """Decide every record again under ``config``; a JSON-able summary."""
    rng = random.Random(config.seed if config.seed is not None else 0)
    changed: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    n = 0
    hit_old = hit_new = 0
    for rec in records:
        if not rec.candidates:
            continue
        n += 1
        decision = decide(
            rec.num_prompt_tokens, candidates_of(rec, config), config, rng, rec.sticky
        )
        reasons[decision.reason.value] += 1
        old = rec.chosen or rec.best
        new = decision.best
        hit_old += decision.hit_tokens.get(old, 0)
        hit_new += decision.hit_tokens[new]
        if new != old:
            changed.append(
                {
                    "request_id": rec.request_id,
                    "session_id": rec.session_id,
                    "old": old,
                    "new": new,
                    "old_reason": rec.reason,
                    "new_reason": decision.reason.value,
                    "old_hit_tokens": decision.hit_tokens.get(old, 0),
                    "new_hit_tokens": decision.hit_tokens[new],
                    "old_cost": decision.costs.get(old),
                    "new_cost": decision.costs[new],
                    "old_outcome": rec.outcome,
                }
            )
    ttfts = [
        c["old_outcome"]["ttft_s"]
        for c in changed
        if c["old_outcome"] and "ttft_s" in c["old_outcome"]
    ]
    return {
        "decisions": n,
        "changed": len(changed),
        "reasons": dict(reasons),
        "predicted_hit_tokens": {"logged": hit_old, "replayed": hit_new},
        "changed_old_ttft_s_median": statistics.median(ttfts) if ttfts else None,
        "changes": changed,
    }


def _settings(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        out[key] = json.loads(value) if value not in ("", "None") else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmesh.router.routing.replay")
    p.add_argument("log", help="a decision log (JSON lines, RouterConfig.decision_log_path)")
    p.add_argument("--set", action="append", default=[], help="a RouterConfig field=value")
    p.add_argument("--changes", type=int, default=20, help="changed decisions to print")
    args = p.parse_args(argv)
    config = RouterConfig(**_settings(args.set))
    summary = replay(read(args.log), config)
    summary["changes"] = summary["changes"][: args.changes]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
