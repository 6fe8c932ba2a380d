"""One rank's share of a replica (model shard + its KV heads), and the worker that runs it.

``load_shard`` is shared by rank 0 (in the engine's process) and the workers, so every rank
builds its shard the same way. ``TPWorker`` is a plain class that ``ray_workers.py`` turns into a
Ray actor: after ``setup`` and ``allocate_kv`` it sits in ``run``, receiving each step's
inputs from rank 0 and taking part in the forward pass, until rank 0 says stop.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmesh.replicas.loader import load_model
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.model_runner import ModelRunner, allocate_kv_cache
from kvmesh.replicas.models.llama import LlamaForCausalLM
from kvmesh.replicas.tp.comm import RENDEZVOUS_TIMEOUT_S, TPGroup, open_store
from kvmesh.replicas.tp.layers import TPShard
from kvmesh.replicas.tp.messages import StepReceiver

log = logging.getLogger(__name__)

EXIT_DELAY_S = 0.5  # time for Ray to deliver a failed worker's error before its process ends


@dataclass(frozen=True)
class ShardSpec:
    """What every rank needs to build its shard (sent once, at start)."""

    model_dir: str
    arch: ModelArchConfig
    dtype: str  # "float32", "bfloat16", ...
    device_type: str  # "cpu" or "cuda"
    max_positions: int
    tp_size: int
    collective_timeout_s: float
    startup_timeout_s: float
    cpu_threads: int | None  # torch threads per rank on CPU (None: leave as is)


def load_shard(spec: ShardSpec, rank: int, group: TPGroup) -> tuple[LlamaForCausalLM, TPShard]:
    shard = TPShard.plan(spec.arch, rank, spec.tp_size, group)
    model = load_model(
        Path(spec.model_dir),
        spec.arch,
        getattr(torch, spec.dtype),
        group.device,
        spec.max_positions,
        tp=shard,
    )
    return model, shard


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class TPWorker:
    """Rank ``rank`` (≥ 1) of a tensor-parallel replica, living in a Ray actor."""

    def __init__(self, rank: int, spec: ShardSpec) -> None:
        self.rank = rank
        self.spec = spec
        if spec.device_type == "cuda":
            torch.cuda.set_device(0)  # Ray shows this actor only its own GPU
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
            if spec.cpu_threads:
                torch.set_num_threads(spec.cpu_threads)
        self.group: TPGroup | None = None
        self.model: LlamaForCausalLM | None = None
        self.runner: ModelRunner | None = None

    def info(self) -> dict[str, Any]:
        """Where this rank runs (for error messages)."""
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": ray.get_gpu_ids(),
        }

    def setup(self, host: str, port: int) -> int:
        """Join rank 0's groups and load this rank's shard; returns its parameter bytes."""
        timeout = min(self.spec.startup_timeout_s, RENDEZVOUS_TIMEOUT_S)
        store = open_store(host, port, self.spec.tp_size, self.rank, timeout)
        self.group = TPGroup(
            store, self.rank, self.spec.tp_size, self.device, self.spec.collective_timeout_s
        )
        self.model, _ = load_shard(self.spec, self.rank, self.group)
        return param_bytes(self.model)

    def allocate_kv(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> None:
        """This rank's KV cache: the same block ids as rank 0's, with only its own heads."""
        assert self.model is not None, "setup() first"
        caches = allocate_kv_cache(
            self.spec.arch,
            num_blocks,
            block_size,
            getattr(torch, self.spec.dtype),
            kv_cache_dtype,
            self.device,
            num_kv_heads=self.model.tp.num_kv_heads,
        )
        self.runner = ModelRunner(self.model, caches, self.device)

    def run(self) -> None:
        """Serve steps until rank 0 says stop.

        On any error (its own, or rank 0 gone) the worker re-raises, so Ray hands the error to
        rank 0, and then ends its process: that closes its sockets, so rank 0's collectives
        fail at once instead of waiting out their timeout (gloo has no way to abort them).
        """
        assert self.runner is not None and self.group is not None, "allocate_kv() first"
        receiver = StepReceiver(self.group, self.device)
        try:
            while (inputs := receiver.recv()) is not None:
                self.runner.forward(inputs)
        except BaseException:
            log.exception("tensor-parallel rank %d failed; exiting", self.rank)
            threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()  # after Ray sends the error
            raise
        self.group.close()

    def param_bytes(self) -> int:
        assert self.model is not None
        return param_bytes(self.model)
