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
