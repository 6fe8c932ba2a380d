"""Packs a scheduled step into tensors, runs the model, and owns the paged KV tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.kernels import AttentionMetadata, KVCacheLayer
from kvmesh.replicas import capacity
from kvmesh.replicas.config import ModelArchConfig
from kvmesh.replicas.request import Request

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def kv_bytes_per_block(
    cfg: ModelArchConfig,
    block_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str,
    num_kv_heads: int | None = None,
) -> int:
    """Bytes one block takes across all layers (K and V, plus scales when quantised): the
    formula of ``capacity.kv_bytes_per_block``, which ``kvmesh plan`` uses too.

    ``num_kv_heads``: the heads this process holds (a tensor-parallel rank's share)."""
    return capacity.kv_bytes_per_block(
        capacity.ModelShape.from_arch(cfg),
        block_size,
        dtype.itemsize,
        kv_cache_dtype=kv_cache_dtype,
        num_kv_heads=num_kv_heads,
    )


def allocate_kv_cache(
    cfg: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str,
    device: torch.device,
    num_kv_heads: int | None = None,
) -> list[KVCacheLayer]:
    """Zero-filled caches: padding slots read as zeros (finite), never as stale NaNs."""
    heads = num_kv_heads or cfg.num_key_value_heads
    shape = (num_blocks, block_size, heads, cfg.head_dim)
    layers = []
    for _ in range(cfg.num_hidden_layers):
        if kv_cache_dtype == "auto":
            layers.append(
                KVCacheLayer(
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
            )
        else:
            qdtype = KV_DTYPES[kv_cache_dtype]
            layers.append(
                KVCacheLayer(
                    torch.zeros(shape, dtype=qdtype, device=device),
                    torch.zeros(shape, dtype=qdtype, device=device),
                    torch.zeros(shape[:3], dtype=torch.float32, device=device),
                    torch.zeros(shape[:3], dtype=torch.float32, device=device),
                )
            )
    return layers


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]


def prepare_inputs(
    scheduled: list[tuple[Request, int]],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
) -> StepInputs:
    """Flatten the step's chunks into one packed batch (no padding between sequences)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qlens: list[int] = []
    slens: list[int] = []
    logits_indices: list[int] = []
    sampling: list[Request] = []
    for (req, n), ids in zip(scheduled, block_ids, strict=True):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        input_ids.extend(req.token_ids[start:end])
        if n == 1:
            positions.append(start)
            slots.append(ids[start // block_size] * block_size + start % block_size)
        else:
            pos = np.arange(start, end)
            positions.extend(pos.tolist())
            slots.extend(
                (np.asarray(ids)[pos // block_size] * block_size + pos % block_size).tolist()
            )
        qlens.append(n)
        slens.append(end)
        if end == req.num_tokens:  # this chunk reaches the last token: sample the next one
            logits_indices.append(len(input_ids) - 1)
            sampling.append(req)
    table = np.zeros((len(block_ids), max(len(b) for b in block_ids)), dtype=np.int32)
    for i, ids in enumerate(block_ids):
        table[i, : len(ids)] = ids
    qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
    np.cumsum(qlens, out=qsl[1:])
    meta = AttentionMetadata(
        query_start_loc=torch.from_numpy(qsl).to(device),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(qlens),
        max_seq_len=max(slens),
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
    )
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
        sampling_requests=sampling,
    )


class ModelRunner:
    """Runs one packed forward pass and returns the logits of the rows that sample."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCacheLayer], device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if inputs.logits_indices.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[inputs.logits_indices])
