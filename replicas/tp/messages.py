"""A step's model inputs as one int32 tensor, so rank 0 sends them with one broadcast.

Why not pickle ``StepInputs``? A pickled Python call per rank per step costs milliseconds; a
broadcast of a preallocated integer buffer costs one gloo round (~0.1–0.5 ms here). Every rank
receives into a fixed ``BUFFER_LEN`` buffer, so a step whose payload fits (every decode step of
up to a few hundred sequences) takes exactly one broadcast; a larger one (a big prefill) takes
a second broadcast of exactly its payload.

Layout: an ``HEADER_LEN`` header ``[cmd, T, B, M, L, payload_len, 0, 0]``, then the payload:
``input_ids[T] positions[T] slot_mapping[T] query_start_loc[B+1] seq_lens[B]
block_tables[B*M] logits_indices[L]``. All values are token ids, positions, block ids or cache
slots, which fit int32 (checked once at start, see ``check_slots_fit``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvmesh.kernels import AttentionMetadata
from kvmesh.replicas.model_runner import StepInputs
from kvmesh.replicas.tp.comm import TPGroup

CMD_STEP = 1
CMD_STOP = 2
HEADER_LEN = 8
BUFFER_LEN = 4096  # int32s: 16 KiB, one broadcast for any decode batch below ~500 sequences
INT32_MAX = 2**31 - 1


def check_slots_fit(num_blocks: int, block_size: int) -> None:
    if num_blocks * block_size > INT32_MAX:
        raise ValueError(
            f"{num_blocks} KV blocks of {block_size} slots exceed the int32 step messages"
        )


def pack_step(inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) as CPU int32 tensors."""
    meta = inputs.meta
    parts = [
        inputs.input_ids,
        inputs.positions,
        meta.slot_mapping,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables.reshape(-1),
        inputs.logits_indices,
    ]
    payload = torch.cat([p.to(torch.int32) for p in parts]).cpu()
    b, m = meta.block_tables.shape
    header = torch.tensor(
        [CMD_STEP, inputs.input_ids.numel(), b, m, inputs.logits_indices.numel(), payload.numel()]
        + [0] * (HEADER_LEN - 6),
        dtype=torch.int32,
    )
    return header, payload


def unpack_step(header: torch.Tensor, payload: torch.Tensor, device: torch.device) -> StepInputs:
    """The inverse of ``pack_step``."""
    _, t, b, m, n_logits, _ = header[:6].tolist()
    sizes = [t, t, t, b + 1, b, b * m, n_logits]
    cpu = payload.numpy()
    qsl, slens = cpu[3 * t : 3 * t + b + 1], cpu[3 * t + b + 1 : 3 * t + 2 * b + 1]
    qlens = np.diff(qsl).tolist()
    seq_lens = slens.tolist()
    ids, pos, slots, qsl_t, slens_t, table, logits = payload.to(device).split(sizes)
    meta = AttentionMetadata(
        query_start_loc=qsl_t,
        seq_lens=slens_t,
        block_tables=table.view(b, m),
        slot_mapping=slots.long(),
        max_query_len=max(qlens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=qlens,
        seq_lens_cpu=seq_lens,
    )
    return StepInputs(
        input_ids=ids.long(),
        positions=pos.long(),
        meta=meta,
        logits_indices=logits.long(),
    )


class StepSender:
    """Rank 0's side: one broadcast per step (two when the payload outgrows the buffer).

    Rank 0 does not wait for its send to complete: it goes straight on to its own forward
    pass, and waits only before it next writes the buffer (by then the send is long done).
    A failed send still surfaces at once, in the forward pass's first all-reduce.
    """

    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self.buffer = torch.zeros(BUFFER_LEN, dtype=torch.int32)
        self._in_flight: list[tuple[Any, torch.Tensor]] = []  # (work, the tensor it sends)

    def _settle(self) -> None:
        in_flight, self._in_flight = self._in_flight, []
        for work, _ in in_flight:
            work.wait()

    def send(self, inputs: StepInputs) -> None:
        header, payload = pack_step(inputs)
        self._settle()
        buf = self.buffer
        buf[:HEADER_LEN] = header
        inline = HEADER_LEN + payload.numel() <= BUFFER_LEN
        if inline:
            buf[HEADER_LEN : HEADER_LEN + payload.numel()] = payload
        self._in_flight.append((self.group.broadcast_ctrl(buf, wait=False), buf))
        if not inline:
            self._in_flight.append((self.group.broadcast_ctrl(payload, wait=False), payload))

    def send_stop(self) -> None:
        self._settle()
        self.buffer.zero_()
        self.buffer[0] = CMD_STOP
        self.group.broadcast_ctrl(self.buffer)


class StepReceiver:
    """A worker's side: waits (without timeout) for rank 0's next message."""

    def __init__(self, group: TPGroup, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.buffer = torch.zeros(BUFFER_LEN, dtype=torch.int32)

    def recv(self) -> StepInputs | None:
        """The next step's inputs, or None when rank 0 says stop."""
        buf = self.buffer
        self.group.broadcast_ctrl(buf, idle_wait=True)
        cmd = int(buf[0])
        if cmd == CMD_STOP:
            return None
        if cmd != CMD_STEP:
            raise RuntimeError(f"unknown tensor-parallel control message {cmd}")
        n = int(buf[5])
        if HEADER_LEN + n <= BUFFER_LEN:
            payload = buf[HEADER_LEN : HEADER_LEN + n].clone()
        else:
            payload = torch.empty(n, dtype=torch.int32)
            self.group.broadcast_ctrl(payload)
        return unpack_step(buf[:HEADER_LEN], payload, self.device)
