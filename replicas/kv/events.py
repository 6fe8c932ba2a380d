"""KV-cache events, as vLLM emits them for llm-d and Dynamo, and their replay."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.replicas.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """A full block became addressable by ``block_hash`` (its KV is computed)."""

    block_hash: BlockHash
    parent_hash: BlockHash | None
    num_tokens: int


@dataclass(frozen=True)
class BlockRemoved:
    """The block named ``block_hash`` was evicted; a request can no longer hit it."""

    block_hash: BlockHash


KVEvent = BlockStored | BlockRemoved


def replay(events: list[KVEvent], start: set[BlockHash] | None = None) -> set[BlockHash]:
    """The set of cached block hashes after applying ``events`` to ``start``."""
    cached = set(start or ())
    for event in events:
        if isinstance(event, BlockStored):
            cached.add(event.block_hash)
        else:
            cached.discard(event.block_hash)
    return cached
