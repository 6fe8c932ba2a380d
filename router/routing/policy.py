"""The routing decision: score every replica by the work the request would cost there.

``cost = rate_factor * (miss_weight * uncached prompt tokens``
``                      + copy_penalty * min(1, copied / (copy_full_share * cache)) * copied``
``                      + fill_weight * (cache fill - the emptiest candidate's) * uncached``
``                      + queue_weight * prefill tokens queued there``
``                      + (queue_over_factor - 1) * queue_weight * queued past queue_soft_limit)``
``     + decode_weight * requests resident there``
``     + kv_penalty * ((kv_usage - kv_soft_limit) / (1 - kv_soft_limit))^2  (above the limit)``
``                  * uncached prompt tokens / prompt tokens  (kv_penalty_by_miss)``

The first two terms are, up to a constant, the request's time to first token on that replica
(prefill is serial, so our prefill waits behind the queued one). The miss weighs more than a
queued token because a miss also takes cache space from the replica's other conversations;
optionally (``queue_soft_limit``, off by default) queued tokens past a limit weigh as much as
missed ones, so a hot prefix spreads to a second replica once its owner's queue is long, and
returns when the queue drains. "Uncached" counts the prefix the replica is predicted to still
hold when the request is admitted (``PrefixIndex.surviving``), not just what it reported.

"Copied" tokens are the uncached ones another candidate holds: sending the request here would
copy a cached prefix to a second replica, where it takes cache space for as long as traffic
follows it and lets that prefix's traffic split between the two. With ``prefix_home`` a
candidate also "holds" the leading blocks last routed to it after it evicted them
(:mod:`kvmesh.router.routing.homes`): a tenant whose system prompt was evicted everywhere goes
back to the replica its traffic went to, instead of splitting its working set over two caches.
Where the copy is a large share of the receiving cache (small caches, long shared prompts) it
displaces other tenants' prefixes for good, so each copied token pays up to ``copy_penalty``
more; in a large cache the same copy is nearly free.

A missed token is stored in the replica's cache; in a fuller cache (more of it holding cached
prefixes, as the router's index counts them) it evicts someone's prefix sooner, so each missed
token also pays ``fill_weight`` x how much fuller this cache is than the emptiest candidate's.
That sends a cold prompt, such as a new tenant's first turn, to the emptier cache; once every
cache is full the term vanishes.

The decode term prices the work sharing every step with us and the conversations likely to
return there. The KV term keeps requests away from a replica about to evict or preempt, in
proportion to the new blocks the request would take there: a turn whose prompt the replica
already holds (in blocks its running requests share) adds little to its KV pressure, and
moving it to an empty replica would cost its whole prefill.

``rate_factor`` (``rate_aware``) turns the prefill terms from tokens into time: the candidates'
median measured prefill rate over this replica's rate (clamped to ``1/rate_max_ratio`` ..
``rate_max_ratio``), so a replica that drains its queue at half the typical rate counts each of
its queued and missed tokens twice. Replicas that report no rate count at the median (or at
``default_prefill_tokens_per_s``); with equal or no reported rates every factor is exactly 1.

The lowest cost wins; near-ties (``tie_tolerance``) are broken at random. Two overrides:

* session affinity: a session's previous replica wins if it costs at most ``session_slack``
  more than the best;
* imbalance guard: if the winner's load (queue + decode terms) exceeds the least loaded
  replica's by ``balance_abs`` *and* by a factor ``balance_rel``, the load estimate or the cache
  prediction is off badly enough that the cost cannot be trusted, and we fall back to power of
  two choices on load alone. With the default thresholds the cost already steers away from such
  skew, so the guard fires rarely; it bounds the damage when it does not.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from kvmesh.router.routing.config import RouterConfig
from kvmesh.router.routing.load import ReplicaLoad


class Reason(StrEnum):
    """Why a replica was chosen (the ``reason`` label of the decision counter)."""

    CACHE_HIT = "cache_hit"
    """Lowest cost, and the chosen replica holds part of the prompt."""
    NO_PREFIX = "no_prefix"
    """Lowest cost, with nothing of the prompt cached on the chosen replica: chosen by load."""
    LOAD_FALLBACK = "load_fallback"
    """The imbalance guard fired: power of two choices on load."""
    SESSION_AFFINITY = "session_affinity"
    """The session's previous replica, close enough to the best."""


@dataclass(frozen=True)
class Candidate:
    replica: Hashable
    hit_tokens: int
    """Predicted cached prompt tokens when the request is admitted (what the cost uses)."""
    load: ReplicaLoad
    reported_hit_tokens: int | None = None
    """The index's match before the eviction cut (None: no cut was considered)."""
    cached_blocks: int = 0
    """Blocks the router believes the replica caches (its prefix tree's size)."""
    home_tokens: int = 0
    """Leading prompt tokens last routed to this replica, cached there or not
    (:mod:`kvmesh.router.routing.homes`; 0 with ``prefix_home`` off)."""

    @property
    def held_tokens(self) -> int:
        """The prompt tokens this replica holds or is home to: what a copy is priced against."""
        return max(self.hit_tokens, self.home_tokens)

    @property
    def cache_fill(self) -> float | None:
        """Share of the replica's cache in use for cached prefixes; None if its size is not
        reported."""
        total = self.load.kv_blocks_total
        return min(self.cached_blocks / total, 1.0) if total > 0 else None


@dataclass(frozen=True)
class Decision:
    ranked: list[Hashable]
    """Every candidate, best first."""
    reason: Reason
    hit_tokens: dict[Hashable, int]
    """Predicted cached prompt tokens per candidate."""
    costs: dict[Hashable, float]
    keys: Sequence[bytes] = ()
    """The prompt's block keys (set by the core, reused when the request is committed)."""
    candidates: Sequence[Candidate] = ()
    """What was ranked (predicted hits and loads): for the decision log and replays."""
    sticky: Hashable | None = None
    """The session's previous replica, if it had one."""

    @property
    def best(self) -> Hashable:
        return self.ranked[0]


def load_term(load: ReplicaLoad, config: RouterConfig) -> float:
    """The queue and decode terms of the cost (what the imbalance guard compares)."""
    return config.queue_weight * load.queued_tokens + config.decode_weight * load.resident


def queue_term(queued_tokens: float, config: RouterConfig) -> float:
    """The queue term of the cost: linear up to ``queue_soft_limit``, steeper past it."""
    cost = config.queue_weight * queued_tokens
    limit = config.queue_soft_limit
    if limit is not None and queued_tokens > limit:
        excess = queued_tokens - limit
        cost += (config.queue_over_factor - 1.0) * config.queue_weight * excess
    return cost


def rate_factors(candidates: Sequence[Candidate], config: RouterConfig) -> list[float]:
    """Per candidate, how many typical-replica seconds one of its prefill tokens takes.

    The reference is the median of the reported rates (a replica without one counts at
    ``default_prefill_tokens_per_s``, else at that median); each rate is clamped to within
    ``rate_max_ratio`` of the reference first. All 1.0 when off, or when no rate differs.
    """
    n = len(candidates)
    if not config.rate_aware or n < 2:
        return [1.0] * n
    measured = [c.load.prefill_tokens_per_s for c in candidates]
    known = sorted(r for r in measured if r is not None)
    default = config.default_prefill_tokens_per_s
    if default is None:
        if not known:
            return [1.0] * n
        default = _median(known)
    rates = [default if r is None else r for r in measured]
    ref = _median(sorted(rates))
    lo, hi = ref / config.rate_max_ratio, ref * config.rate_max_ratio
    return [1.0 if r == ref else ref / min(max(r, lo), hi) for r in rates]


def _median(xs: Sequence[float]) -> float:
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def kv_term(kv_usage: float, config: RouterConfig, new_share: float = 1.0) -> float:
    """The KV term: quadratic past ``kv_soft_limit``, times ``new_share`` (the share of the
    prompt that would take new blocks there) when ``kv_penalty_by_miss`` is on."""
    soft = config.kv_soft_limit
    if kv_usage <= soft or soft >= 1.0:
        return 0.0
    x = (kv_usage - soft) / (1.0 - soft)
    scale = min(max(new_share, 0.0), 1.0) if config.kv_penalty_by_miss else 1.0
    return config.kv_penalty * min(x, 1.0) ** 2 * scale


def miss_term(
    miss: int, copied: int, kv_blocks_total: int, extra_fill: float, config: RouterConfig
) -> float:
    """The miss term (before the rate factor): ``miss_weight`` per uncached token, plus
    ``fill_weight`` x ``extra_fill`` (this cache's fill over the emptiest candidate's) per
    uncached token, plus ``copy_penalty`` per ``copied`` token (uncached here, cached on
    another candidate) scaled by the copy's share of this replica's cache over
    ``copy_full_share`` (capped at 1; nothing when the replica does not report its size)."""
    cost = (config.miss_weight + config.fill_weight * extra_fill) * miss
    cache_tokens = kv_blocks_total * config.block_size
    if copied <= 0 or config.copy_penalty <= 0.0 or cache_tokens <= 0:
        return cost
    share = copied / (cache_tokens * config.copy_full_share)
    return cost + config.copy_penalty * min(share, 1.0) * copied


@dataclass(frozen=True)
class CostTerms:
    """One candidate's cost, term by term (token equivalents)."""

    miss: float
    queue: float
    decode: float
    kv: float

    @property
    def total(self) -> float:
        return self.miss + self.queue + self.decode + self.kv


@dataclass(frozen=True)
class Rivals:
    """What every candidate's cost is measured against: the most any candidate holds of the
    prompt (cached, or last routed there: ``Candidate.held_tokens``) and the emptiest reported
    cache."""

    best_hit_tokens: int = 0
    least_fill: float | None = None

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> Rivals:
        fills = [f for f in (c.cache_fill for c in candidates) if f is not None]
        return cls(
            best_hit_tokens=max((c.held_tokens for c in candidates), default=0),
            least_fill=min(fills) if len(fills) > 1 else None,
        )

    def extra_fill(self, cand: Candidate) -> float:
        fill = cand.cache_fill
        if fill is None or self.least_fill is None:
            return 0.0
        return fill - self.least_fill


def cost_terms(
    num_prompt_tokens: int,
    cand: Candidate,
    config: RouterConfig,
    rate_factor: float = 1.0,
    rivals: Rivals = Rivals(),
) -> CostTerms:
    """The cost of sending a prompt of ``num_prompt_tokens`` tokens to ``cand`` among the
    candidates summarised by ``rivals``."""
    miss = max(num_prompt_tokens - cand.hit_tokens, 0)
    copied = min(max(rivals.best_hit_tokens - cand.held_tokens, 0), miss)
    new_share = miss / num_prompt_tokens if num_prompt_tokens else 1.0
    extra_fill = rivals.extra_fill(cand)
    kv_blocks_total = cand.load.kv_blocks_total
    return CostTerms(
        miss=rate_factor * miss_term(miss, copied, kv_blocks_total, extra_fill, config),
        queue=rate_factor * queue_term(cand.load.queued_tokens, config),
        decode=config.decode_weight * cand.load.resident,
        kv=kv_term(cand.load.kv_usage, config, new_share),
    )


def decide(
    num_prompt_tokens: int,
    candidates: Sequence[Candidate],
    config: RouterConfig,
    rng: random.Random,
    sticky: Hashable | None = None,
) -> Decision:
    """Rank ``candidates`` for a prompt of ``num_prompt_tokens`` tokens."""
    if not candidates:
        raise ValueError("no candidate replicas")
    costs: dict[Hashable, float] = {}
    hits: dict[Hashable, int] = {}
    loads: dict[Hashable, float] = {}
    factors = rate_factors(candidates, config)
    rivals = Rivals.of(candidates)
    for c, factor in zip(candidates, factors, strict=True):
        # The guard and tie-breaks compare the linear load in tokens; the cost uses the queue
        # term, both prefill terms priced at the replica's rate.
        loads[c.replica] = load_term(c.load, config)
        hits[c.replica] = c.hit_tokens
        costs[c.replica] = cost_terms(num_prompt_tokens, c, config, factor, rivals).total

    order = sorted(costs, key=costs.__getitem__)
    best_cost = costs[order[0]]
    n_tied = 1
    while n_tied < len(order) and costs[order[n_tied]] <= best_cost + config.tie_tolerance:
        n_tied += 1
    if n_tied > 1:
        # Near-ties: prefer the lighter load, then chance (so identical cold requests spread).
        tied = order[:n_tied]
        rng.shuffle(tied)
        tied.sort(key=loads.__getitem__)
        order[:n_tied] = tied

    if (
        config.session_affinity
        and sticky is not None
        and sticky in costs
        and costs[sticky] <= best_cost + config.session_slack
        and not _overloaded(loads[sticky], loads, config)
    ):
        order.remove(sticky)
        order.insert(0, sticky)
        return Decision(
            order, Reason.SESSION_AFFINITY, hits, costs, candidates=candidates, sticky=sticky
        )

    if len(order) > 1 and _overloaded(loads[order[0]], loads, config):
        a, b = rng.sample(order, 2)
        winner = a if loads[a] <= loads[b] else b
        order.remove(winner)
        order.insert(0, winner)
        return Decision(
            order, Reason.LOAD_FALLBACK, hits, costs, candidates=candidates, sticky=sticky
        )

    reason = Reason.CACHE_HIT if hits[order[0]] > 0 else Reason.NO_PREFIX
    return _made(order, reason, hits, costs, candidates, sticky)


def _made(order, reason, hits, costs, candidates, sticky) -> Decision:
    return Decision(order, reason, hits, costs, candidates=candidates, sticky=sticky)


def _overloaded(load: float, loads: dict[Hashable, float], config: RouterConfig) -> bool:
    least = min(loads.values())
    return load - least > config.balance_abs and load > config.balance_rel * least
