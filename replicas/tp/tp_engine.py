"""``TPEngine``: an ``LLMEngine`` whose model and KV cache are spread over tensor-parallel ranks.

Everything above the model runner is inherited unchanged: rank 0 (this process) schedules,
allocates KV blocks, samples and detokenizes. The KV block ids are rank 0's decisions and mean
the same on every rank; each rank's cache just holds its own KV heads. Per step, rank 0
broadcasts the packed inputs once and runs its shard; the workers run theirs alongside.

Failure: a worker that dies closes its sockets and rank 0's next collective fails at once; one
that hangs makes it fail after ``collective_timeout_s``. Either way the step raises
``TPWorkerError`` naming the rank, every later step raises it too, and ``check_health`` raises
it, so the serving layer ends the requests with that error and Ray Serve replaces the replica.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch

from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.model_runner import ModelRunner, StepInputs, allocate_kv_cache
from kvmesh.replicas.tp.comm import RENDEZVOUS_TIMEOUT_S, TPGroup, open_store
from kvmesh.replicas.tp.layers import TPShard, check_tp_size
from kvmesh.replicas.tp.messages import StepSender, check_slots_fit
from kvmesh.replicas.tp.worker import ShardSpec, load_shard, param_bytes

log = logging.getLogger(__name__)

DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0
DEFAULT_STARTUP_TIMEOUT_S = 600.0  # placing the ranks and loading their shards


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died, hung or failed: this replica cannot serve any more."""


class TPRunner(ModelRunner):
    """Rank 0's runner: send the step's inputs to the workers, then run rank 0's shard."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        device: torch.device,
        sender: StepSender,
        engine: TPEngine,
    ) -> None:
        super().__init__(model, kv_caches, device, engine.args.block_size, engine.eos_token_ids)
        self.sender = sender
        self._engine = weakref.ref(engine)  # no cycle: the engine's finalizer must be able to run

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        engine = self._engine()
        if engine is not None and engine.error is not None:
            raise engine.error
        try:
            self.sender.send(inputs)
            return super().forward(inputs)
        except Exception as exc:
            if engine is None:
                raise
            raise engine._fail(exc) from exc


class TPEngine(LLMEngine):
    """Drop-in ``LLMEngine`` for ``tensor_parallel_size`` ranks (1 works too: no Ray, a
    one-rank group, the sharded code path; the GPU check uses that)."""

    def __init__(
        self,
        args: EngineArgs | None = None,
        *,
        collective_timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.collective_timeout_s = collective_timeout_s or float(
            os.environ.get("KVMESH_TP_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S)
        )
        self.startup_timeout_s = startup_timeout_s or DEFAULT_STARTUP_TIMEOUT_S
        self.error: TPWorkerError | None = None
        self.workers = None  # cluster.WorkerSet when tensor_parallel_size > 1
        self.group: TPGroup | None = None
        self.shard: TPShard | None = None
        self.rank_param_bytes: list[int] = []
        self._saved_threads: int | None = None
        self._finalizer: weakref.finalize | None = None
        super().__init__(args, **kwargs)

    # ---- start ----------------------------------------------------------------------------
    def _build_runner(self) -> tuple[ModelRunner, int]:
        args = self.args
        n = args.tensor_parallel_size
        check_tp_size(self.arch, n)  # a clear ValueError before anything starts
        cpu_threads = None
        if self.device.type == "cpu":
            # Ranks share this machine's cores; more threads than cores per rank only spin.
            cpu_threads = max(1, len(os.sched_getaffinity(0)) // n)
            if torch.get_num_threads() > cpu_threads:
                self._saved_threads = torch.get_num_threads()
                torch.set_num_threads(cpu_threads)
        spec = ShardSpec(
            model_dir=str(self.model_dir),
            arch=self.arch,
            dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type,
            max_positions=self.max_model_len,
            tp_size=n,
            collective_timeout_s=self.collective_timeout_s,
            startup_timeout_s=self.startup_timeout_s,
            cpu_threads=cpu_threads,
        )
        try:
            return self._start(spec)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, spec: ShardSpec) -> tuple[ModelRunner, int]:
        args, n = self.args, spec.tp_size
        host, actors = "127.0.0.1", []
        if n > 1:
            import ray

            from kvmesh.replicas.tp.ray_workers import WorkerSet, release_workers

            self.workers = WorkerSet.start(spec, self.startup_timeout_s)
            actors = self.workers.actors
            self._finalizer = weakref.finalize(
                self,
                release_workers,
                list(actors),
                self.workers.pg if self.workers.owns_pg else None,
            )
            if self.workers.gpu_index is not None:
                torch.cuda.set_device(self.workers.gpu_index)
            host = ray.util.get_node_ip_address()
        store = open_store(host, 0, n, 0, min(self.startup_timeout_s, RENDEZVOUS_TIMEOUT_S))
        setups = [a.setup.remote(host, store.port) for a in actors]
        self.group = TPGroup(store, 0, n, self.device, self.collective_timeout_s)
        self.model, self.shard = load_shard(spec, 0, self.group)
        self.rank_param_bytes = [param_bytes(self.model), *self._get(setups)]
        num_blocks = self._num_kv_blocks(self.shard.num_kv_heads)
        check_slots_fit(num_blocks, args.block_size)
        allocs = [
            a.allocate_kv.remote(num_blocks, args.block_size, args.kv_cache_dtype) for a in actors
        ]
        kv_caches = allocate_kv_cache(
            self.arch,
            num_blocks,
            args.block_size,
            self.dtype,
            args.kv_cache_dtype,
            self.device,
            num_kv_heads=self.shard.num_kv_heads,
        )
        self._get(allocs)
        if self.workers is not None:
            self.workers.start_loops()
        runner = TPRunner(self.model, kv_caches, self.device, StepSender(self.group), self)
        return runner, num_blocks

    def _get(self, refs: list) -> list:
        if not refs:
            return []
        import ray

        return ray.get(refs, timeout=self.startup_timeout_s)

    # ---- failure --------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> TPWorkerError:
        """Turn a failed step into the replica's permanent, explanatory error."""
        if self.error is None:
            lines = []
            if self.workers is not None:
                self.workers.wait_loops(timeout_s=1.0)  # let a dead worker's loop report in
                lines = self.workers.failed() or self.workers.unresponsive(timeout_s=1.0)
            cause = "; ".join(lines) or "no worker reported an error"
            if "Timed out" in str(exc):
                cause += f" (hung? collectives time out after {self.collective_timeout_s:g}s)"
            self.error = TPWorkerError(
                f"tensor-parallel replica failed ({self.args.tensor_parallel_size} ranks): "
                f"{cause}. Rank 0 saw: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            )
            log.error("%s", self.error)
        return self.error

    def check_health(self) -> None:
        """Raise ``TPWorkerError`` if a step failed or any worker's loop has ended."""
        if self.error is not None:
            raise self.error
        if self.workers is not None:
            lines = self.workers.failed()
            if lines:
                self.error = TPWorkerError(
                    "tensor-parallel replica lost a worker: " + "; ".join(lines)
                )
                raise self.error

    def is_healthy(self) -> bool:
        try:
            self.check_health()
        except TPWorkerError:
            return False
        return True

    # ---- stop -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers (politely if they are healthy), kill them, free the group."""
        if self.workers is not None:
            if self.error is None and self.group is not None and self.workers.loops:
                try:
                    StepSender(self.group).send_stop()
                    self.workers.wait_loops(timeout_s=5.0)
                except Exception:
                    pass
            self.workers.kill()
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.group is not None:
            self.group.close()
            self.group = None
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        if self.error is None:
            self.error = TPWorkerError("this tensor-parallel engine was shut down")
        super().shutdown()

    def __enter__(self) -> TPEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
