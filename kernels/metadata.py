"""What attention needs to know about one packed step (prefills and decodes together)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes a packed batch of ``B`` sequences and ``T`` new tokens.

    Sequence ``i`` contributes tokens ``query_start_loc[i]:query_start_loc[i+1]`` of the packed
    batch; they sit at the *end* of its context of ``seq_lens[i]`` tokens (cached prefix first),
    and its K/V live in the blocks listed in ``block_tables[i]``.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32, on the device
    seq_lens: torch.Tensor  # [B] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1 = skip)
    max_query_len: int
    max_seq_len: int
    # The same facts as Python lists, so CPU code can plan without device syncs.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Scratch space for a backend to plan once per step and reuse across layers.
    plan: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def for_chunks(
        cls, chunks: list[tuple[int, int]], block_tables: list[list[int]]
    ) -> AttentionMetadata:
        """A step of ``(cached, new)`` token chunks over the given block tables, with no
        cache writes (every slot -1): what kernel tests and microbenchmarks attend over."""
        tables = torch.zeros(len(chunks), max(map(len, block_tables)), dtype=torch.int32)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        qlens = [new for _, new in chunks]
        slens = [cached + new for cached, new in chunks]
        starts = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        starts[1:] = torch.cumsum(torch.tensor(qlens), 0)
        return cls(
            query_start_loc=starts,
            seq_lens=torch.tensor(slens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.full((sum(qlens),), -1, dtype=torch.int64),
            max_query_len=max(qlens),
            max_seq_len=max(slens),
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
        )


@dataclass
class KVCacheLayer:
    """One layer's paged K/V: ``[num_blocks, block_size, num_kv_heads, head_dim]`` each.

    With a quantised cache (int8 or fp8 e4m3) ``k_scale``/``v_scale`` hold one float32 scale per
    (block, slot, kv head): ``value = stored * scale``.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]
