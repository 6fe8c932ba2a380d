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

    # ---- replicas ------------------------------------------------------------------------
    def add_replica(self, replica: Hashable) -> None:
        if replica in self._slot:
            return
        slot = self._free_slots.pop() if self._free_slots else self._alloc_slot()
        self._slot[replica] = slot
        self._by_replica[replica] = set()
        self._spec_expiry[replica] = {}

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
        self._free_slots.append(slot)

    def replicas(self) -> list[Hashable]:
        return list(self._slot)

    def __contains__(self, replica: Hashable) -> bool:
        return replica in self._slot

    # ---- what replicas report -----------------------------------------------------------
    def store(self, replica: Hashable, key: bytes) -> None:
        bit = 1 << self._slot[replica]
        self._confirmed[key] = self._confirmed.get(key, 0) | bit
        self._by_replica[replica].add(key)

    def remove(self, replica: Hashable, key: bytes) -> None:
        """The replica evicted ``key``: drop it, including any speculative entry."""
        bit = 1 << self._slot[replica]
        if key in self._by_replica[replica]:
            self._by_replica[replica].discard(key)
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
