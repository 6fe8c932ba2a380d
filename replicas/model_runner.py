"""Packs a scheduled step into tensors, runs the model, samples, and owns the paged KV tensors.

The runner sees a step only as ``SchedulerOutput`` (plain data: token ids, positions, block
tables, and the requests it meets for the first time) and answers a ``RunnerOutput`` (each
sampling row's token). What sampling keeps per request (parameters, random stream, token
history, penalty statistics) is the runner's own ``SamplingRow``, dropped when the scheduler
says the request ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.kernels import AttentionMetadata, KVCacheLayer
from kvmesh.kernels.cpu_memory import keep_freed_memory, zeros_on_huge_pages
from kvmesh.replicas import capacity
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.models.llama import LlamaForCausalLM
from kvmesh.replicas.sampler import SamplingRow, sample
from kvmesh.replicas.step_types import RunnerOutput, ScheduledChunk, SchedulerOutput
from kvmesh.replicas.structured.bitmask import apply_bitmask

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def kv_storage_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype of an unquantised KV cache: the model's, except for a float16 model on a
    CPU, whose cache is float32 (the CPU attention kernels read float32 and bfloat16 only).

    On a CPU, Q, K and V leave a 16-bit projection and are rotated and attended in float32
    (``models/llama.py``); a bfloat16 model's K and V are rounded to bfloat16 as they are
    stored. Decode attention reads the whole cache every step, so storing it in bfloat16
    halves the bytes of the step's memory-bound part (and doubles the tokens a memory budget
    holds), where bfloat16 mode has already given up float32's exactness."""
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


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
    """Zero-filled caches: padding slots read as zeros (finite), never as stale NaNs. On a CPU
    the caches sit on huge pages (``kernels/cpu_memory``: fewer TLB misses in decode)."""
    heads = num_kv_heads or cfg.num_key_value_heads
    shape = (num_blocks, block_size, heads, cfg.head_dim)
    layers = []
    dtype = kv_storage_dtype(dtype, device)
    on_cpu = torch.device(device).type == "cpu"

    def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if on_cpu:
            return zeros_on_huge_pages(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    for _ in range(cfg.num_hidden_layers):
        if kv_cache_dtype == "auto":
            layers.append(KVCacheLayer(zeros(shape, dtype), zeros(shape, dtype)))
        else:
            qdtype = KV_DTYPES[kv_cache_dtype]
            layers.append(
                KVCacheLayer(
                    zeros(shape, qdtype),
                    zeros(shape, qdtype),
                    zeros(shape[:3], torch.float32),
                    zeros(shape[:3], torch.float32),
                )
            )
    return layers


@dataclass
class StepInputs:
    """A step as the model takes it: packed token ids, positions and attention metadata
    (slot mapping, block tables, lengths), and which rows' logits to compute."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


def prepare_inputs(
    chunks: list[ScheduledChunk], block_size: int, device: torch.device
) -> StepInputs:
    """Flatten the step's chunks into one packed batch (no padding between sequences)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qlens: list[int] = []
    slens: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    max_blocks = 0
    for chunk in chunks:
        n, ids = chunk.num_tokens, chunk.block_ids
        start, end = chunk.start, chunk.start + n
        input_ids.extend(chunk.token_ids)
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
        query_start_loc.append(len(input_ids))
        max_blocks = max(max_blocks, len(ids))
        if chunk.sample:  # this chunk reaches the last token: sample the next one
            logits_indices.append(len(input_ids) - 1)
    table = np.zeros((len(chunks), max_blocks), dtype=np.int32)
    for i, chunk in enumerate(chunks):
        table[i, : len(chunk.block_ids)] = chunk.block_ids
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
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
    )


class ModelRunner:
    """Runs one packed forward pass and samples the rows that end at their last token."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCacheLayer],
        device,
        block_size: int = 16,
        eos_token_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        self.model = model
        # On a CPU the linear weights go into oneDNN's layout once, here, where every
        # process that runs the model (an engine, a tensor-parallel rank) passes.
        self.packed_linear_layers = model.pack_linear_layers()
        if torch.device(device).type == "cpu":
            keep_freed_memory()  # steps reuse freed activations instead of faulting new pages
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.eos_token_ids = list(eos_token_ids)
        self.rows: dict[str, SamplingRow] = {}

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the step's forward pass and sample; raises only for faults of the model
        forward itself (the replica's), never for one row's sampling (that row's result)."""
        for request_id in sched.finished_request_ids:
            self.rows.pop(request_id, None)
        for new in sched.new_requests:
            generator = None
            if new.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(new.seed)
            self.rows[new.request_id] = SamplingRow(
                new.request_id, new.prompt_token_ids, new.params, generator
            )
        logits = self.forward(prepare_inputs(sched.chunks, self.block_size, self.device))
        rows = [self.rows[c.request_id] for c in sched.chunks if c.sample]
        if not rows:
            return RunnerOutput()
        if sched.structured is not None:  # grammar rows: only their allowed tokens remain
            apply_bitmask(logits, sched.structured.bitmask, sched.structured.rows)
        results = sample(logits, rows, self.eos_token_ids)
        for row, result in zip(rows, results, strict=True):
            if not isinstance(result, Exception):
                row.token_ids.append(result[0])
        return RunnerOutput({row.request_id: r for row, r in zip(rows, results, strict=True)})

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if inputs.logits_indices.numel() == 0:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[inputs.logits_indices])
