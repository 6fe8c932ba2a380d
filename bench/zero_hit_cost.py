"""Prefix caching at a 0% hit rate: caching off vs on, interleaved over 3 rounds.

    .venv/bin/python bench/zero_hit_cost.py

Single back-to-back runs on this machine vary by ~5%, more than the cost being measured, so
the two settings alternate in order across rounds and the medians are compared. Prints JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kv_cache_bench import run_batch
from workloads import random_requests


def main() -> None:
    tok_s: dict[str, list[float]] = {"off": [], "on": []}
    for rnd in range(3):
        prompts = [p for p, _ in random_requests(32, (480, 480), (32, 32), seed=10 + rnd)]
        for mode in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
            result = run_batch(prompts, 32, enable_prefix_caching=mode == "on")
            tok_s[mode].append(result["total_tok_s"])
    ratio = statistics.median(tok_s["on"]) / statistics.median(tok_s["off"])
    print(json.dumps({"total_tok_s": tok_s, "median_on_over_off": ratio}, indent=2))


if __name__ == "__main__":
    main()
