"""Apply allowed-token bitmasks to logits: disallowed entries become -inf, in place.

The bitmask has one int32 row per sampling row of the step (bit ``j`` of word ``w``: token
``32w + j`` is allowed); only the constrained rows (``rows``) are read, and only those rows
of the logits are written, so an unconstrained request's logits are never touched.

The mask goes in as an additive bias: 0 where allowed (``x + 0`` is ``x``, bit for bit) and
-inf elsewhere, added with one ``index_add_``. On a CPU that is several times faster than
``masked_fill_`` with a boolean mask, whose CPU kernel is slow (3.5 ms for 32 rows of 49,152
here); the bits are unpacked by NumPy there, by shifts on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ``[rows, ceil(V/32)]`` → uint8 ``[rows, V]``, 1 where allowed."""
    if bitmask.device.type == "cpu":
        as_bytes = bitmask.contiguous().numpy().view(np.uint8)
        bits = np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits)
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].to(torch.uint8)


@torch.inference_mode()  # the logits are the forward pass's inference tensor
def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask ``logits[r]`` with ``bitmask[r]`` for each ``r`` in ``rows``, in place."""
    if not rows:
        return
    vocab = logits.shape[-1]
    index = torch.tensor(rows)
    masks = bitmask.index_select(0, index)
    if logits.device.type != "cpu":
        masks, index = masks.to(logits.device, non_blocking=True), index.to(logits.device)
    allowed = allowed_tokens(masks, min(vocab, masks.shape[-1] * 32))
    # (allowed - 1) is 0 or -1; two finite products take -1 past the largest float to -inf
    # and keep 0 exact (0 * inf would be NaN; log(0) is a slow path on CPUs).
    bias = allowed.to(device=logits.device, dtype=logits.dtype).sub_(1)
    bias.mul_(torch.finfo(logits.dtype).max).mul_(2.0)
    if bias.shape[-1] < vocab:  # logits wider than the mask: the rest is not allowed
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[-1]), value=-torch.inf)
    logits.index_add_(0, index, bias)
