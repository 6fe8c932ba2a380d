"""A fixed pool of KV blocks: reference counts, the hash → block map, and an LRU free list."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvmesh.replicas.block_hash import BlockHash
from kvmesh.replicas.kv.events import BlockRemoved, BlockStored, KVEvent

NULL_BLOCK_ID = 0
"""Block 0 is never handed out: it pads block tables and stands in for blocks freed early
(sliding window), so every entry of a block table is a valid index."""


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Owns every block. Free blocks wait in LRU order; cached free blocks can still be hit.

    The free list is an ``OrderedDict`` keyed by block id: allocation pops from the front
    (least recently freed first), a prefix hit removes a block from anywhere in O(1).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._by_hash: dict[BlockHash, KVBlock] = {}
        # KV events, recorded only once a consumer asked for them (``record_events``): an
        # engine nobody reads events from must not grow a queue without bound. A deque: the
        # engine thread appends while a replica's stats path drains from another thread;
        # deque append/popleft are atomic, so neither waits for the other.
        self._events: deque[KVEvent] | None = None

    @property
    def num_usable(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def get_cached(self, block_hash: BlockHash) -> KVBlock | None:
        return self._by_hash.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take ``n`` free blocks (evicting their cached contents); caller checked ``num_free``."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._by_hash[block.block_hash]
                if self._events is not None:
                    self._events.append(BlockRemoved(block.block_hash))
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Share already-computed blocks with one more request (prefix hit)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block. Pass a request's blocks last-first, so its tail
        (least likely to be shared) is evicted before its prefix."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} released more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None
                if block.block_hash is None:
                    # Nothing to keep: reuse it before any cached block.
                    self._free.move_to_end(block.block_id, last=False)

    def cache(
        self, block: KVBlock, block_hash: BlockHash, parent: BlockHash | None, n: int
    ) -> None:
        """Make a just-computed full block addressable by its hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._by_hash:
            return  # another request computed the same block first; keep theirs
        block.block_hash = block_hash
        self._by_hash[block_hash] = block
        if self._events is not None:
            self._events.append(BlockStored(block_hash, parent, n))

    def record_events(self, enabled: bool) -> bool:
        """Start (keeping what is queued) or stop (dropping it) recording KV events; returns
        whether they were being recorded."""
        was = self._events is not None
        if enabled and not was:
            self._events = deque()
        elif not enabled:
            self._events = None
        return was

    def drain_events(self) -> list[KVEvent]:
        """Events since the last drain, oldest first (safe from any thread); [] when none are
        recorded."""
        events = self._events
        if events is None:
            return []
        return [events.popleft() for _ in range(len(events))]

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and put the free list back in a new pool's order, with
        no events (nothing a consumer saw changes). Every block must be free."""
        if len(self._free) != self.num_usable:
            raise RuntimeError("reset_prefix_cache needs every block free")
        for block in self.blocks:
            block.block_hash = None
        self._by_hash.clear()
        self._free = OrderedDict((i, None) for i in range(1, len(self.blocks)))

    def cached_hashes(self) -> set[BlockHash]:
        return set(self._by_hash)

    def check_invariants(self) -> None:
        """Raise if the pool's books do not balance (used by property-based tests)."""
        free_ids = set(self._free)
        for block in self.blocks[1:]:
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id} has ref_count {block.ref_count}")
            if (block.ref_count == 0) != (block.block_id in free_ids):
                raise AssertionError(f"block {block.block_id} free-list membership is wrong")
            if block.block_hash is not None and self._by_hash.get(block.block_hash) is not block:
                raise AssertionError(f"block {block.block_id} hash map entry is wrong")
        if NULL_BLOCK_ID in free_ids:
            raise AssertionError("the null block is on the free list")
        if len(self._by_hash) != sum(b.block_hash is not None for b in self.blocks):
            raise AssertionError("hash map has entries for blocks that do not carry them")
