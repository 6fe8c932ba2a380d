"""The communication of one tensor-parallel replica: two process groups over one TCP store.

* The **control** group (gloo, CPU tensors) carries each step's inputs from rank 0 to the
  workers. Workers block in it while the replica is idle, so their receive has no practical
  timeout (gloo takes a timeout per operation; everything else is bounded by ``timeout_s``).
  Step inputs are small integers, so a CPU broadcast is cheap even on GPU machines, and the
  idle wait keeps no GPU kernel spinning.
* The **compute** group (NCCL on CUDA, gloo on CPU) carries the model's all-reduces and the
  logits gather. Its ``timeout_s`` bounds how long any rank waits for a peer, so a worker that
  hangs turns into an error on rank 0 instead of a replica that hangs forever (a worker that
  dies closes its sockets, and gloo reports that at once).

The groups are built directly as ``ProcessGroupGloo``/``ProcessGroupNCCL`` objects rather than
through ``torch.distributed.init_process_group``: that leaves the process's default group alone,
so several replicas (or a test that builds one after another) can live in one process.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist

# Workers wait in the control group for as long as the replica is idle.
IDLE_TIMEOUT = timedelta(days=365)
# Running workers joining rank 0's groups (the ranks were placed and started before this).
RENDEZVOUS_TIMEOUT_S = 120.0


def open_store(host: str, port: int, world_size: int, rank: int, timeout_s: float) -> dist.Store:
    """Rank 0 serves the rendezvous store (``port=0`` picks a free port); the others join it."""
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class TPGroup:
    """This rank's view of the replica's ranks: broadcast, all-reduce and gather."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.timeout_s = timeout_s
        timeout = timedelta(seconds=timeout_s)
        self.ctrl = dist.ProcessGroupGloo(
            dist.PrefixStore("kvmesh/ctrl", store), rank, size, timeout
        )
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.compute = dist.ProcessGroupNCCL(
                dist.PrefixStore("kvmesh/nccl", store), rank, size, opts
            )
        else:
            self.compute = dist.ProcessGroupGloo(
                dist.PrefixStore("kvmesh/compute", store), rank, size, timeout
            )

    # ---- control: rank 0 → workers ------------------------------------------------------
    def broadcast_ctrl(
        self, tensor: torch.Tensor, idle_wait: bool = False, wait: bool = True
    ) -> dist.Work | None:
        """Send (rank 0) or receive (workers) a CPU tensor in place. ``idle_wait``: a worker
        waiting for the next step, for as long as the replica stays idle. ``wait=False``
        returns the pending work instead of waiting for it."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if idle_wait:
            opts.timeout = IDLE_TIMEOUT
        work = self.ctrl.broadcast([tensor], opts)
        if not wait:
            return work
        work.wait()
        return None

    # ---- compute: inside the forward pass -----------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; every rank gets the same bits back."""
        self.compute.allreduce([x]).wait()
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each rank's ``x`` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self.compute.gather([parts], [x], opts).wait()
            return parts
        self.compute.gather([], [x], opts).wait()
        return None

    def close(self) -> None:
        """Drop the connections (best effort: a peer may already be gone)."""
        for pg in (self.compute, self.ctrl):
            with contextlib.suppress(Exception):
                pg.shutdown()
