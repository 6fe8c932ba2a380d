"""Which replica holds which prefix block, as one router believes.

Two layers per replica:

* *confirmed* blocks, exactly what the replica's reports say (events applied in order, or a
  snapshot), so a reported eviction removes the entry;
* *speculative* blocks, the prompt blocks of requests this router just sent there. They make the
  next request of the same conversation (or tenant) follow the first one at once, instead of
  after the next report; they expire after ``ttl`` unless a report confirms them, so a guess that
  never came true (request aborted, blocks evicted before we heard of them) fades by itself.

For lookups both layers are folded into one map ``block key -> bitmask of replica slots``: the
longest cached prefix of a prompt on every replica costs one dict lookup per prompt block, with
an AND across replicas, instead of one set lookup per (block, replica).

A confirmed entry says the block was cached at the last report, not that it still will be when
a request queued behind others is admitted: a replica whose cache is full evicts its least
recently used free blocks for every block it stores. So the index also keeps, per replica, an
approximate LRU clock (issue #15): the replica's *store count* (blocks stored, from its
reports), each confirmed block's store count at its last use (stored, or touched by a request
this router sent there, or released when that request completed), the cache's capacity in
blocks (the entry count when the replica first reported an eviction) and the blocks pinned by
this router's requests still in flight there. :meth:`surviving` uses them to cut a predicted
prefix where the queued work ahead would push it out of the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence


class PrefixIndex:
    """Block key → replicas holding it, confirmed or speculative."""

    def __init__(self) -> None:
        self._slot: dict[Hashable, int] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._confirmed: dict[bytes, int] = {}
        self._speculative: dict[bytes, int] = {}
        self._by_replica: dict[Hashable, set[bytes]] = {}
        # replica -> key -> expiry of its latest speculative insert.
        self._spec_expiry: dict[Hashable, dict[bytes, float]] = {}
        # (expiry, replica, keys) in insertion order; a constant TTL keeps it sorted.
        self._spec_queue: deque[tuple[float, Hashable, tuple[bytes, ...]]] = deque()
        # LRU model (see the module docstring), per replica.
        self._stores: dict[Hashable, int] = {}
        self._last_use: dict[Hashable, dict[bytes, int]] = {}
        self._capacity: dict[Hashable, int] = {}
        self._pinned: dict[Hashable, dict[bytes, int]] = {}

    # ---- replicas ------------------------------------------------------------------------
    def add_replica(self, replica: Hashable) -> None:
        if replica in self._slot:
            return
        slot = self._free_slots.pop() if self._free_slots else self._alloc_slot()
        self._slot[replica] = slot
        self._by_replica[replica] = set()
        self._spec_expiry[replica] = {}
        self._stores[replica] = 0
        self._last_use[replica] = {}
        self._pinned[replica] = {}

    def _alloc_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def remove_replica(self, replica: Hashable) -> None:
        """Forget everything about a replica (it died or was scaled away)."""
        slot = self._slot.pop(replica, None)
        if slot is None:
            return
        bit = 1 << slot
        for key in self._by_replica.pop(replica):
            _clear(self._confirmed, key, bit)
        for key in self._spec_expiry.pop(replica):
            _clear(self._speculative, key, bit)
        for table in (self._stores, self._last_use, self._capacity, self._pinned):
            table.pop(replica, None)
        self._free_slots.append(slot)

    def replicas(self) -> list[Hashable]:
        return list(self._slot)

    def __contains__(self, replica: Hashable) -> bool:
        return replica in self._slot

    # ---- what replicas report -----------------------------------------------------------
    def store(self, replica: Hashable, key: bytes) -> None:
        bit = 1 << self._slot[replica]
        self._confirmed[key] = self._confirmed.get(key, 0) | bit
        have = self._by_replica[replica]
        have.add(key)
        if replica in self._capacity and len(have) > self._capacity[replica]:
            self._capacity[replica] = len(have)
        n = self._stores[replica] + 1
        self._stores[replica] = n
        self._last_use[replica][key] = n
        # Confirmed now: the guess is no longer needed (and would count the block twice in
        # the replica's cached blocks).
        if self._spec_expiry[replica].pop(key, None) is not None:
            _clear(self._speculative, key, bit)

    def remove(self, replica: Hashable, key: bytes) -> None:
        """The replica evicted ``key``: drop it, including any speculative entry."""
        bit = 1 << self._slot[replica]
        have = self._by_replica[replica]
        if key in have:
            # An eviction: the cache is full, and this is about how many blocks it holds.
            if len(have) > self._capacity.get(replica, 0):
                self._capacity[replica] = len(have)
            have.discard(key)
            self._last_use[replica].pop(key, None)
            _clear(self._confirmed, key, bit)
        if self._spec_expiry[replica].pop(key, None) is not None:
            _clear(self._speculative, key, bit)

    def reset(self, replica: Hashable, keys: Iterable[bytes]) -> None:
        """Replace the replica's confirmed blocks with a snapshot (speculation is kept)."""
        bit = 1 << self._slot[replica]
        for key in self._by_replica[replica]:
            _clear(self._confirmed, key, bit)
        fresh = set(keys)
        self._by_replica[replica] = fresh
        confirmed = self._confirmed
        for key in fresh:
            confirmed[key] = confirmed.get(key, 0) | bit
        # A snapshot carries no order: count its blocks as used now.
        old = self._last_use[replica]
        now = self._stores[replica]
        self._last_use[replica] = {key: old.get(key, now) for key in fresh}

    def num_confirmed(self, replica: Hashable) -> int:
        return len(self._by_replica.get(replica, ()))

    def confirmed_keys(self, replica: Hashable) -> frozenset[bytes]:
        return frozenset(self._by_replica.get(replica, ()))

    # ---- what this router guesses -------------------------------------------------------
    def speculate(self, replica: Hashable, keys: Sequence[bytes], now: float, ttl: float) -> None:
        """Count ``keys`` as cached on ``replica`` until ``now + ttl`` unless confirmed."""
        if replica not in self._slot or not keys:
            return
        bit = 1 << self._slot[replica]
        expiry = now + ttl
        mine = self._spec_expiry[replica]
        spec = self._speculative
        have = self._by_replica[replica]
        # Confirmed blocks need no guess (a reported removal would drop both anyway), and a
        # conversation's next turn is mostly confirmed already.
        fresh = tuple(key for key in keys if key not in have)
        for key in fresh:
            mine[key] = expiry
            spec[key] = spec.get(key, 0) | bit
        if fresh:
            self._spec_queue.append((expiry, replica, fresh))

    def expire(self, now: float) -> None:
        """Drop speculative entries whose time is up (called before each lookup)."""
        queue = self._spec_queue
        while queue and queue[0][0] <= now:
            _, replica, keys = queue.popleft()
            mine = self._spec_expiry.get(replica)
            if mine is None:
                continue  # replica removed meanwhile
            bit = 1 << self._slot[replica]
            for key in keys:
                expiry = mine.get(key)
                if expiry is not None and expiry <= now:
                    del mine[key]
                    _clear(self._speculative, key, bit)

    def num_speculative(self, replica: Hashable | None = None) -> int:
        if replica is None:
            return sum(len(m) for m in self._spec_expiry.values())
        return len(self._spec_expiry.get(replica, ()))

    # ---- the replica's LRU, as far as this router can tell ----------------------------------
    def touch(self, replica: Hashable, keys: Sequence[bytes]) -> None:
        """A request of ours uses (or just released) ``keys`` on ``replica``: most recent now."""
        last = self._last_use.get(replica)
        if last is None:
            return
        now = self._stores[replica]
        have = self._by_replica[replica]
        for key in keys:
            if key in have:
                last[key] = now

    def pin(self, replica: Hashable, keys: Sequence[bytes], delta: int) -> None:
        """``delta`` = +1 / -1: a request of ours holding ``keys`` arrived at / left ``replica``.

        A block in use by a running request cannot be evicted, and one a queued request of ours
        will use is refreshed (or recomputed) when that request is admitted, before ours.
        """
        pinned = self._pinned.get(replica)
        if pinned is None:
            return
        for key in keys:
            n = pinned.get(key, 0) + delta
            if n > 0:
                pinned[key] = n
            else:
                pinned.pop(key, None)

    def capacity(self, replica: Hashable) -> int | None:
        """Blocks the replica's cache holds, once it has reported an eviction; else None."""
        return self._capacity.get(replica)

    def surviving(
        self,
        replica: Hashable,
        keys: Sequence[bytes],
        n_matched: int,
        incoming_blocks: float,
        horizon: float,
    ) -> int:
        """How many of the first ``n_matched`` blocks of ``keys`` should still be cached on
        ``replica`` after ``incoming_blocks`` more blocks are stored there (the queued work
        ahead of a new request).

        A block survives if it is pinned by a request of ours in flight there, or if the blocks
        stored since its last use plus the incoming ones stay under ``horizon`` x the cache's
        capacity (LRU: a block is evicted once that many newer blocks have pushed it out).
        A block's last use is at least its descendants' in the prompt: whoever used a block
        used its parents, and the engine releases a request's blocks tail first, so a parent
        is never older in its LRU than its child. Before the replica's first reported
        eviction nothing is cut.
        """
        cap = self._capacity.get(replica)
        if cap is None or n_matched <= 0:
            return n_matched
        limit = horizon * cap - incoming_blocks
        now = self._stores[replica]
        last = self._last_use[replica]
        pinned = self._pinned[replica]
        # Effective last use of block i: the latest over blocks i..n_matched-1; pinned and
        # speculative-only blocks (our own recent requests') count as used now.
        recent = [0] * n_matched
        latest = -1
        for i in range(n_matched - 1, -1, -1):
            key = keys[i]
            used = now if key in pinned else last.get(key, now)
            latest = max(latest, used)
            recent[i] = latest
        for i in range(n_matched):
            if now - recent[i] >= limit:
                return i
        return n_matched

    # ---- lookups ------------------------------------------------------------------------
    def match(
        self, keys: Sequence[bytes], replicas: Iterable[Hashable] | None = None
    ) -> dict[Hashable, int]:
        """Length (in blocks) of the longest cached prefix of ``keys`` on each replica."""
        wanted = list(self._slot) if replicas is None else [r for r in replicas if r in self._slot]
        result = dict.fromkeys(wanted, 0)
        if not keys or not wanted:
            return result
        slot_of = {self._slot[r]: r for r in wanted}
        alive = 0
        for slot in slot_of:
            alive |= 1 << slot
        confirmed, spec = self._confirmed, self._speculative
        for depth, key in enumerate(keys):
            holders = alive & (confirmed.get(key, 0) | spec.get(key, 0))
            dropped = alive & ~holders
            if dropped:
                if depth:  # those dropped at depth 0 keep their 0
                    for slot in _bits(dropped):
                        result[slot_of[slot]] = depth
                alive = holders
                if not alive:
                    return result
        for slot in _bits(alive):
            result[slot_of[slot]] = len(keys)
        return result


def _clear(table: dict[bytes, int], key: bytes, bit: int) -> None:
    mask = table.get(key, 0) & ~bit
    if mask:
        table[key] = mask
    else:
        table.pop(key, None)


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
