"""Where each prefix was last sent: a memory that outlives the replicas' caches.

The prefix index (:mod:`kvmesh.router.routing.index`) tracks what each replica holds *now*:
once a replica evicts a tenant's system prompt, the index forgets it, and the tenant's next
request is cold everywhere. The policy then places it by load and cache fill alone, often on
the other replica, where the tenant's later conversations follow it half the time: one
tenant's working set ends up in two caches, each evicting the other tenants' prefixes.

This map remembers, for each block key of every routed prompt, the replica it was last sent
to, whether or not that replica still caches it. A prompt's *home* on a replica is how many of
its leading blocks were last sent there. The policy treats those blocks like cached ones when
pricing a copy (:func:`kvmesh.router.routing.policy.cost_terms`): moving a tenant off its
home pays what copying a cached prefix pays, so the tenant returns home after an eviction
unless its home is overloaded. That is what a router keyed on routed text (Ray's
``PrefixCacheAffinityRouter``) does by construction.

Bounded: the least recently routed keys go first (``max_blocks``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class PrefixHomes:
    """Block key -> the replica it was last routed to, least recently routed first."""

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self._max = max_blocks
        self._home: OrderedDict[bytes, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._home)

    def record(self, replica: Hashable, keys: Sequence[bytes]) -> None:
        """A prompt with these block keys was sent to ``replica``."""
        home = self._home
        for key in keys:
            home[key] = replica
            home.move_to_end(key)
        while len(home) > self._max:
            home.popitem(last=False)

    def home_blocks(self, keys: Sequence[bytes]) -> dict[Hashable, int]:
        """Per replica, how many leading blocks of ``keys`` were last sent there.

        A replica counts up to the deepest leading block last sent to it (a conversation that
        moved keeps its system prompt's home where the system prompt was last sent). The walk
        stops at the first block never routed.
        """
        depth: dict[Hashable, int] = {}
        home = self._home
        for i, key in enumerate(keys):
            replica = home.get(key)
            if replica is None:
                break
            depth[replica] = i + 1
        return depth

    def forget_replica(self, replica: Hashable) -> None:
        """A replica left: its prefixes have no home until they are routed again."""
        for key in [k for k, r in self._home.items() if r == replica]:
            del self._home[key]
