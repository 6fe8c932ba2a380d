"""The one prefix-block hash shared by the KV-cache manager and the router.

A full block of ``block_size`` tokens is named by a chained hash:
``H(parent_hash, token_ids, extra_keys)``. Chaining makes a block's name depend on every token
before it, so two prompts share a block hash only if they share the whole prefix up to and
including that block.

We use BLAKE2b with a 128-bit digest. Collisions are the one way a prefix cache can return
wrong KV: for 128 bits the birthday bound puts the chance of any collision among 10^12
distinct blocks (far more than any fleet caches in its lifetime) below 10^-14, so we do not
also compare token ids on a hit. Python's built-in ``hash`` would not do: it is 64-bit, salted
per process (the router and replicas live in different processes) and trivially collidable.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes
"""16 bytes. Stable across processes and machines, so replicas and routers agree on names."""

ROOT_HASH: BlockHash = b"\x00" * 16
"""The parent of a sequence's first block."""


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()
) -> BlockHash:
    """Hash of one full block given its parent's hash, its token ids and extra keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple = (),
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of every *full* block of ``token_ids`` from block ``start_block`` on.

    ``parent`` is the hash of block ``start_block - 1`` (None for the first block), so a
    caller that already hashed a prefix extends the chain without rehashing it.
    """
    hashes: list[BlockHash] = []
    num_full = len(token_ids) // block_size
    for i in range(start_block, num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys)
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class BlockHasher:
    """Names a model's prefix blocks: the block size and the hash's extra keys, carried
    together so that every party that names blocks (the ingress for the router, the engine's
    KV-cache manager) names them alike. Build it with :meth:`for_model`, the one place that
    decides the extra keys."""

    block_size: int
    extra_keys: tuple = ()

    @classmethod
    def for_model(cls, served_model_name: str, block_size: int) -> BlockHasher:
        """The served model's hasher: its name is the extra key, so two models (or two
        versions behind an alias) never share a block name."""
        return cls(block_size, (served_model_name,))

    def hash_blocks(
        self, token_ids: Sequence[int], parent: BlockHash | None = None, start_block: int = 0
    ) -> list[BlockHash]:
        """Hashes of every full block of ``token_ids`` (see :func:`hash_block_tokens`)."""
        return hash_block_tokens(token_ids, self.block_size, self.extra_keys, parent, start_block)
