"""Per-request block tables over the block pool, with automatic prefix caching.

The scheduler sees blocks only through this manager: a prefix hit is an opaque
``CachedPrefix`` (how many tokens it covers), a request's blocks are a list of ids; the pool's
reference counts, hash map and free list stay inside.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.replicas.block_hash import BlockHasher
from kvmesh.replicas.kv.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock
from kvmesh.replicas.kv.events import KVEvent
from kvmesh.replicas.request import Request


@dataclass(frozen=True)
class CachedPrefix:
    """A request's longest run of leading full blocks already in the cache (a lookup's
    answer; pass it back to ``allocate_slots`` to share them)."""

    blocks: tuple[KVBlock, ...]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size


class KVCacheManager:
    """Decides which blocks hold each request's KV.

    A request's blocks are ``[prefix hits...] + [newly allocated...]``; full blocks are
    registered under their chained hash once their KV has been computed, so later requests with
    the same prefix share them.
    """

    def __init__(
        self,
        num_blocks: int,
        hasher: BlockHasher,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        self.hasher = hasher
        self.block_size = hasher.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_registered: dict[str, int] = {}
        self._num_window_freed: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- capacity -----------------------------------------------------------------------
    @property
    def num_blocks_total(self) -> int:
        return self.pool.num_usable

    @property
    def num_blocks_free(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable * self.block_size

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_usable

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------
    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """Longest run of the request's full blocks already in the cache.

        At least one token is always left to compute, since the step that computes the last
        token is the one that produces the next token's logits.
        """
        hits: list[KVBlock] = []
        if self.enable_prefix_caching:
            hashes = req.full_block_hashes(self.hasher)
            limit = (req.num_tokens - 1) // self.block_size
            for block_hash in hashes[:limit]:
                block = self.pool.get_cached(block_hash)
                if block is None:
                    break
                hits.append(block)
        return CachedPrefix(tuple(hits), self.block_size)

    def record_query(self, req: Request, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------
    def allocate_slots(
        self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if blocks run out.

        ``prefix`` (at admission only): prefix hits to share; they sit before the new tokens.
        """
        blocks = self.req_blocks.get(req.request_id, [])
        if prefix is None and self.blocks_needed(req.num_computed_tokens + num_new_tokens) <= len(
            blocks
        ):
            return True  # the usual decode step: its slot is in a block it already holds
        cached = list(prefix.blocks) if prefix is not None else []
        computed = req.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(blocks) - len(cached)
        # Hits sitting on the free list leave it when we take them.
        reclaimed = sum(1 for b in cached if b.ref_count == 0)
        if max(need, 0) + reclaimed > self.pool.num_free:
            return False
        self.pool.touch(cached)
        new = self.pool.allocate(need) if need > 0 else []
        self.req_blocks[req.request_id] = blocks + cached + new
        if cached:
            self._num_registered[req.request_id] = len(cached)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that this step filled (KV computed for all their tokens)."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        done = self._num_registered.get(req.request_id, 0)
        if num_full <= done:
            return
        hashes = req.full_block_hashes(self.hasher)
        blocks = self.req_blocks[req.request_id]
        for i in range(done, num_full):
            if blocks[i].block_id == NULL_BLOCK_ID:
                continue
            parent = hashes[i - 1] if i > 0 else None
            self.pool.cache(blocks[i], hashes[i], parent, self.block_size)
        self._num_registered[req.request_id] = num_full

    def free_outside_window(self, req: Request) -> None:
        """Release blocks that lie wholly before the sliding window of every future token."""
        if self.sliding_window is None:
            return
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return
        # The next token (position num_computed) sees positions > num_computed - window.
        first_needed = max(0, req.num_computed_tokens - self.sliding_window + 1)
        done = self._num_window_freed.get(req.request_id, 0)
        upto = first_needed // self.block_size
        if upto <= done:
            return
        freed = [b for b in blocks[done:upto] if b.block_id != NULL_BLOCK_ID]
        self.pool.release(reversed(freed))
        for i in range(done, upto):
            blocks[i] = self.pool.blocks[NULL_BLOCK_ID]
        self._num_window_freed[req.request_id] = upto

    def free(self, req: Request) -> None:
        """Return every block of ``req`` (finished, aborted or preempted)."""
        blocks = self.req_blocks.pop(req.request_id, [])
        self._num_registered.pop(req.request_id, None)
        self._num_window_freed.pop(req.request_id, None)
        self.pool.release(b for b in reversed(blocks) if b.block_id != NULL_BLOCK_ID)

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, [])]

    def check_invariants(self) -> None:
        """Raise if the books do not balance: the pool's own, and every block's reference
        count equal to the block tables holding it (used by property-based tests)."""
        self.pool.check_invariants()
        holders: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                if b.block_id != NULL_BLOCK_ID:
                    holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            if block.ref_count != holders.get(block.block_id, 0):
                raise AssertionError(f"block {block.block_id}: {block} vs {holders}")

    # ---- what the router needs ----------------------------------------------------------
    def record_events(self, enabled: bool) -> bool:
        """Record KV events (only while something drains them); returns the previous state."""
        return self.pool.record_events(enabled)

    def drain_events(self) -> list[KVEvent]:
        return self.pool.drain_events()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (all must be free), without events."""
        self.pool.reset_prefix_cache()

    def cached_block_hashes(self) -> set[bytes]:
        return self.pool.cached_hashes()
