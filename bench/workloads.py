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


def offline_workload(name: str, n: int, seed: int) -> list[tuple[list[int], int]]:
    """The offline throughput workloads, as (prompt token ids, forced output length) pairs.

    ``mixed``: ``n`` prompts of U[32, 512] tokens, outputs U[32, 256].
    ``shared-prefix``: 8 groups of ``n // 8`` prompts, each group on one 448-token prefix plus
    32 tokens of its own, 64 output tokens each (run with prefix caching on)."""
    if name == "mixed":
        return random_requests(n, (32, 512), (32, 256), seed=seed)
    if name == "shared-prefix":
        prompts = shared_prefix_requests(8, max(1, n // 8), 448, 32, seed=seed + 1)
        return [(p, 64) for p in prompts]
    raise ValueError(f"unknown workload {name!r}: use mixed or shared-prefix")
