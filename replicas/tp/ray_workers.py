"""Ray plumbing for a tensor-parallel replica: placement, worker actors, liveness, teardown.

One placement-group bundle per rank, ``STRICT_PACK`` (all ranks on one node, where gloo/NCCL
are fast). Inside a Ray Serve replica that was given ``placement_group_bundles`` (see
``tp_bundles``), the replica itself sits in bundle 0 and the workers take bundles 1..N-1 of
that group. Offline (``LLM(...)`` in a plain process) this module creates the group, pins
bundle 0 to this node, and removes the group again on shutdown.

Workers are ordinary (non-detached) actors owned by the engine's process, so Ray kills them if
that process dies; ``WorkerSet.kill`` (also run by a finalizer) kills them on shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvmesh.replicas.tp.worker import ShardSpec, TPWorker

log = logging.getLogger(__name__)


def tp_bundles(tp_size: int, use_gpu: bool) -> list[dict[str, float]]:
    """Placement-group bundles for one replica: one per rank (rank 0 is the replica itself)."""
    bundle = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
    return [dict(bundle) for _ in range(tp_size)]


def ensure_ray(num_cpus: int) -> None:
    """Connect to Ray: the cluster in ``RAY_ADDRESS`` if set, else a new local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(
            address="local",  # a new cluster, not one a `ray start` left on this machine
            num_cpus=max(os.cpu_count() or 1, num_cpus),
            include_dashboard=False,
            log_to_driver=True,
        )


class WorkerSet:
    """The Ray actors of ranks 1..N-1 and the placement group they live in."""

    def __init__(
        self, actors: list[Any], pg: PlacementGroup, owns_pg: bool, gpu_index: int | None
    ) -> None:
        self.actors = actors
        self.pg = pg
        self.owns_pg = owns_pg
        self.gpu_index = gpu_index  # the GPU bundle 0 reserved for rank 0 (offline, CUDA)
        self.loops: list[ray.ObjectRef] = []
        self.infos: list[dict[str, Any]] = []

    @classmethod
    def start(cls, spec: ShardSpec, timeout_s: float) -> WorkerSet:
        n, use_gpu = spec.tp_size, spec.device_type == "cuda"
        ensure_ray(num_cpus=n)
        pg, owns_pg = _placement_group(n, use_gpu, timeout_s)
        gpu_index = _probe_bundle0_gpu(pg) if use_gpu and owns_pg else None
        remote = ray.remote(TPWorker)
        actors = [
            remote.options(
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
                max_concurrency=2,  # run() blocks one thread; info() etc. use the other
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg,
                    placement_group_bundle_index=rank,
                    placement_group_capture_child_tasks=False,
                ),
            ).remote(rank, spec)
            for rank in range(1, n)
        ]
        workers = cls(actors, pg, owns_pg, gpu_index)
        try:
            workers.infos = ray.get([a.info.remote() for a in actors], timeout=timeout_s)
        except BaseException:
            workers.kill()
            raise
        return workers

    def start_loops(self) -> None:
        self.loops = [a.run.remote() for a in self.actors]

    def failed(self) -> list[str]:
        """A line for each worker whose loop has ended (died, raised, or was killed)."""
        if not self.loops:
            return []
        ready, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        lines = []
        for ref in ready:
            rank = self.loops.index(ref) + 1
            try:
                ray.get(ref, timeout=1)
                why = "its loop returned"
            except Exception as exc:
                why = _describe(getattr(exc, "cause", None) or exc)
            lines.append(f"rank {rank} {self._where(rank)} ended: {why}")
        return lines

    def unresponsive(self, timeout_s: float) -> list[str]:
        """A line for each worker that does not answer a ping (hung, or stopped)."""
        pings = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        return [
            f"rank {rank} {self._where(rank)} did not answer a ping within {timeout_s:.0f}s"
            for rank, ref in enumerate(pings, start=1)
            if ref not in ready
        ]

    def wait_loops(self, timeout_s: float) -> None:
        if self.loops:
            ray.wait(self.loops, num_returns=len(self.loops), timeout=timeout_s)

    def _where(self, rank: int) -> str:
        info = self.infos[rank - 1] if rank - 1 < len(self.infos) else {}
        return f"(pid {info.get('pid', '?')} on {info.get('node_ip', '?')})"

    def kill(self) -> None:
        """Kill every worker and release the placement group (idempotent, never raises)."""
        release_workers(self.actors, self.pg if self.owns_pg else None)
        self.actors = []
        self.owns_pg = False


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (a worker's own error, not Ray's wrapper)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else ''}"


def release_workers(actors: list[Any], pg: PlacementGroup | None) -> None:
    """Kill ``actors`` and remove ``pg`` (a finalizer calls this too: it must not raise)."""
    if not ray.is_initialized():
        return
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def _placement_group(n: int, use_gpu: bool, timeout_s: float) -> tuple[PlacementGroup, bool]:
    """The replica's group (inside Serve) or a new one pinned to this node (offline)."""
    current = get_current_placement_group()
    if current is not None:
        if len(current.bundle_specs) < n:
            raise ValueError(
                f"tensor_parallel_size={n} needs {n} placement-group bundles, but this replica's "
                f"group has {len(current.bundle_specs)}: deploy with "
                f"placement_group_bundles=tp_bundles({n}, ...) and STRICT_PACK"
            )
        return current, False
    bundles = tp_bundles(n, use_gpu)
    # Rank 0 is this process: keep the group on this node.
    bundles[0][f"node:{ray.util.get_node_ip_address()}"] = 0.001
    pg = placement_group(bundles, strategy="STRICT_PACK", name=f"kvmesh-tp-{os.getpid()}")
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        need = "1 GPU + 1 CPU" if use_gpu else "1 CPU"
        raise RuntimeError(
            f"could not place {n} tensor-parallel ranks ({need} each, on one node) within "
            f"{timeout_s:.0f}s; cluster resources: {ray.available_resources()}"
        )
    return pg, True


def _probe_bundle0_gpu(pg: PlacementGroup) -> int:
    """Which local CUDA device bundle 0 reserved for rank 0 (this process, not an actor)."""

    @ray.remote(num_cpus=0, num_gpus=1)
    def gpu_ids() -> list[str]:
        return [str(i) for i in ray.get_gpu_ids()]

    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
    physical = ray.get(gpu_ids.options(scheduling_strategy=strategy).remote(), timeout=60)[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        return ids.index(physical) if physical in ids else 0
    return int(physical)
