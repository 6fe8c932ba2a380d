"""Apply allowed-token bitmasks to logits: disallowed entries become -inf, in place.

The bitmask has one int32 row per sampling row of the step (bit ``j`` of word ``w``: token
``32w + j`` is allowed); only the constrained rows (``rows``) are read, and only those rows
of the logits are written, so an unconstrained request's logits are never touched. Plain
torch: it runs wherever the model does, with nothing to compile.
"""

from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ``[rows, ceil(V/32)]`` → bool ``[rows, V]``, True where allowed."""
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


@torch.inference_mode()  # the logits are the forward pass's inference tensor
def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask ``logits[r]`` with ``bitmask[r]`` for each ``r`` in ``rows``, in place."""
    if not rows:
        return
    index = torch.tensor(rows, device=logits.device)
    masks = bitmask.to(logits.device, non_blocking=True).index_select(0, index)
    allowed = allowed_tokens(masks, logits.shape[-1])
    if allowed.shape[-1] < logits.shape[-1]:  # logits wider than the mask: not allowed
        pad = logits.shape[-1] - allowed.shape[-1]
        allowed = torch.nn.functional.pad(allowed, (0, pad), value=False)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, -torch.inf))
