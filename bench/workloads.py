"""Synthetic workloads shared by the benchmarks (seeded, so every engine sees the same one)."""

from __future__ import annotations

import random

LOW_ID, HIGH_ID = 100, 49000  # ordinary SmolLM2 tokens, clear of the special ones


def random_requests(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0
) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs with uniformly drawn lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        out.append(
            ([rng.randrange(LOW_ID, HIGH_ID) for _ in range(plen)], rng.randint(*output_range))
        )
    return out


def shared_prefix_requests(
    groups: int, per_group: int, prefix_len: int, suffix_len: int, seed: int = 0
) -> list[list[int]]:
    """``groups`` x ``per_group`` prompts; each group shares a ``prefix_len``-token prefix."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        prefix = [rng.randrange(LOW_ID, HIGH_ID) for _ in range(prefix_len)]
        for _ in range(per_group):
            prompts.append(prefix + [rng.randrange(LOW_ID, HIGH_ID) for _ in range(suffix_len)])
    return prompts
