"""Megatron-style sharding of a Llama-family model: which slice each rank holds, and the layers
that put the slices back together.

* Q/K/V and gate/up are **column-parallel**: each rank computes its own heads (its own slice of
  the MLP's hidden units) from the full input, so no communication is needed after them.
* ``o_proj`` and ``down_proj`` are **row-parallel**: each rank multiplies its slice of the
  input features, and one all-reduce sums the partial outputs.
* The embedding and LM head are **vocabulary-parallel**: each rank holds ``ceil(V/N)`` rows
  (zero-padded at the end); the embedding all-reduces, the logits are gathered on rank 0.
* When there are fewer KV heads than ranks, each rank holds one KV head, the one its query
  heads attend to (so each KV head is *replicated* ``N / num_kv_heads`` times).
* RMSNorm weights and the RoPE table are replicated.

``TPShard`` is pure arithmetic on the config, so the engine can validate a size before any
worker starts, and a test can check each rank's slices without any process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.kernels import PackableLinear
from kvmesh.replicas.model_arch import ModelArchConfig

if TYPE_CHECKING:
    from kvmesh.replicas.tp.comm import TPGroup

# Checkpoint weight name (its last two parts) → how it is split: (kind, dim).
_SPLITS: dict[str, tuple[str, int]] = {
    "q_proj.weight": ("q", 0),
    "q_proj.bias": ("q", 0),
    "k_proj.weight": ("kv", 0),
    "k_proj.bias": ("kv", 0),
    "v_proj.weight": ("kv", 0),
    "v_proj.bias": ("kv", 0),
    "o_proj.weight": ("q", 1),
    "gate_proj.weight": ("mlp", 0),
    "up_proj.weight": ("mlp", 0),
    "down_proj.weight": ("mlp", 1),
    "embed_tokens.weight": ("vocab", 0),
    "lm_head.weight": ("vocab", 0),
}


def check_tp_size(cfg: ModelArchConfig, size: int) -> None:
    """Raise ValueError unless ``size`` ranks can split this model's heads and MLP evenly."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if size < 1:
        problems.append("it must be at least 1")
    else:
        if heads % size:
            problems.append(f"num_attention_heads={heads} is not divisible by it")
        if kv_heads % size and size % kv_heads:
            problems.append(
                f"num_key_value_heads={kv_heads} neither divides it nor is divisible by it"
            )
        if cfg.intermediate_size % size:
            problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by it")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={size} does not fit {cfg.architecture}: " + "; ".join(problems)
        )


@dataclass(frozen=True, eq=False)
class TPShard:
    """What rank ``rank`` of ``size`` holds, plus the group it talks through (None = plan only)."""

    rank: int
    size: int
    head_dim: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (1 when KV heads are replicated)
    kv_head_start: int  # first KV head (in the checkpoint's numbering) on this rank
    intermediate_size: int  # MLP hidden units on this rank
    vocab_size: int  # the full vocabulary
    vocab_per_rank: int  # rows of the embedding / LM head on each rank (last one zero-padded)
    group: TPGroup | None = None

    @classmethod
    def plan(
        cls, cfg: ModelArchConfig, rank: int, size: int, group: TPGroup | None = None
    ) -> TPShard:
        check_tp_size(cfg, size)
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside [0, {size})")
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        if kv_heads >= size:
            local_kv, kv_start = kv_heads // size, rank * (kv_heads // size)
        else:  # replicate: ranks r*kv/size .. share a KV head, the one their queries use
            local_kv, kv_start = 1, rank * kv_heads // size
        return cls(
            rank=rank,
            size=size,
            head_dim=cfg.head_dim,
            num_heads=heads // size,
            num_kv_heads=local_kv,
            kv_head_start=kv_start,
            intermediate_size=cfg.intermediate_size // size,
            vocab_size=cfg.vocab_size,
            vocab_per_rank=-(-cfg.vocab_size // size),
            group=group,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def weight_slice(self, name: str) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of checkpoint tensor ``name`` that this rank loads; None =
        the whole tensor (a replicated weight such as a norm)."""
        split = _SPLITS.get(".".join(name.rsplit(".", 2)[-2:]))
        if split is None:
            return None
        kind, dim = split
        if kind == "q":
            size = self.num_heads * self.head_dim
            start = self.rank * size
        elif kind == "kv":
            size = self.num_kv_heads * self.head_dim
            start = self.kv_head_start * self.head_dim
        elif kind == "mlp":
            size = self.intermediate_size
            start = self.rank * size
        else:  # vocab: the last rank's slice may be short (its parameter is zero-padded)
            start = min(self.vocab_start, self.vocab_size)
            return dim, start, min(start + self.vocab_per_rank, self.vocab_size)
        return dim, start, start + size

    # ---- communication, used by the layers below ----------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("this TPShard has no process group: it can load, not run")
        return self.group.all_reduce(x)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[T, V]`` on rank 0 from each rank's ``[T, V/N]``; an empty
        ``[0, V]`` tensor on the other ranks (only rank 0 samples)."""
        if self.group is None:
            raise RuntimeError("this TPShard has no process group: it can load, not run")
        parts = self.group.gather_to_first(logits)
        if parts is None:
            return logits.new_empty((0, self.vocab_size))
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


class RowParallelLinear(PackableLinear):
    """A linear layer over this rank's slice of the input features; an all-reduce sums the
    ranks' partial outputs. Subclassing keeps the parameter name (``weight``) unchanged."""

    def __init__(self, in_features: int, out_features: int, shard: TPShard) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding; ids owned by other ranks read as zeros here, and the
    all-reduce fills them in."""

    def __init__(self, hidden_size: int, shard: TPShard) -> None:
        super().__init__(shard.vocab_per_rank, hidden_size)
        self.shard = shard

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.shard.vocab_start
        outside = (local < 0) | (local >= self.shard.vocab_per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.shard.all_reduce(x)


def row_parallel_linear(in_features: int, out_features: int, tp: TPShard | None) -> PackableLinear:
    """A bias-free output projection: a plain linear layer without TP, row-parallel with it.
    ``in_features`` is this rank's share."""
    if tp is None:
        return PackableLinear(in_features, out_features, bias=False)
    return RowParallelLinear(in_features, out_features, tp)


def vocab_embedding(vocab_size: int, hidden_size: int, tp: TPShard | None) -> nn.Embedding:
    if tp is None:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(hidden_size, tp)
