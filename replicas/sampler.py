"""Turn each sequence's logits into its next token: penalties, temperature, top-k/p, min-p.

One batched path serves a batch that mixes every parameter: per-row values travel as small
tensors and every transform is a row-wise tensor op, so a step costs a fixed number of ops and
a single device-to-host transfer, however many rows and whatever their parameters.

Greedy rows take the argmax of their (penalised, masked) logits: the same tokens, bit for bit,
as applying the same transforms to the row alone. Random rows invert their CDF at one uniform
drawn per row from the request's own ``torch.Generator``: rows with temperature and top-p alone
straight from the logits, rows with top-k or min-p after one batched pass of masks, each by
``kernels.torch_ops.sample_rows`` (one C++ pass per row on a CPU). Each random row draws
exactly one number per step from its generator and every op works along one row (no reduction
is split across rows or threads differently for different batch shapes), so a seeded request
gives the same tokens whatever else shares its batch.

Logprobs are those of the model's raw distribution (before penalties and temperature), as vLLM
reports them.

Numerical safety: every value inside the accepted parameter ranges must give a token, never
NaN or inf. Tiny temperatures or repetition penalties would overflow float32 logits to inf, so
temperatures below ``SAMPLING_EPS`` sample greedily (``SamplingParams.greedy``, as vLLM does)
and logits are clamped to finite values after each transform; masked entries stay ``-inf`` and
at least one entry always survives the masks, and a draw never lands on a masked entry.
Returned logprobs are finite: ``-inf`` is reported as ``LOGPROB_FLOOR`` (as OpenAI does), so
every body the API sends is strict JSON.

Penalties read per-request token statistics (distinct tokens seen, output counts) that are
kept on the request and extended by the tokens added since the previous step, and touch only
those tokens' logits: no step re-reads a request's whole history or sweeps the vocabulary.

Faults stay with their request: ``sample`` returns, per row, either ``(token, logprobs)`` or
the exception that row raised, and the engine fails only that request. A row with no finite
logit fails alone; any other fault in the batched path re-runs the batch row by row, so only
the rows that fault on their own fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvmesh.kernels.torch_ops import argmax_rows, sample_rows, top_p_drop
from kvmesh.replicas.request import TokenSequence
from kvmesh.replicas.sampling_params import SamplingParams

LOGPROB_FLOOR = -9999.0
"""The logprob reported for tokens of probability zero (finite, unlike ``-inf``)."""
_MAX_LOGIT = torch.finfo(torch.float32).max / 4
"""Clamp bound for transformed logits: finite, and a difference of two stays finite."""

RowResult = tuple[int, dict[int, float] | None] | Exception


@dataclass
class SamplingRow(TokenSequence):
    """What sampling keeps of one request across its steps: its parameters, its own random
    stream, its tokens so far (penalties and ``min_tokens`` read them) and the penalty
    statistics. The model runner holds one per running request, keyed by request id; the
    runner appends each token it samples, so nothing outside it feeds the history."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    sampler_state: Any = None
    plain_greedy: bool = field(init=False)
    """Greedy with nothing to apply first (no penalties, logprobs or ``min_tokens``): the
    whole batch takes the bare argmax when every row is. Fixed for the request's life, so
    worked out once rather than per step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.params
        self.plain_greedy = (
            p.greedy and not p.needs_penalties and p.logprobs is None and p.min_tokens == 0
        )


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN becomes masked (-inf), +inf the largest finite value; -inf stays masked."""
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=_MAX_LOGIT, neginf=float("-inf")
    ).clamp_(max=_MAX_LOGIT)


# ---- penalties: sparse per-request statistics, extended incrementally --------------------------
class PenaltyState:
    """What penalties need of a request's history: the distinct tokens it has seen (prompt and
    output) and how often each occurs in the output. Penalties only ever change the logits of
    these tokens, so they are applied sparsely: O(distinct tokens) work, not O(vocabulary).

    Kept on the request and extended by the tokens added since the previous step (one per
    decode step); device tensors grow by doubling, so extending is amortised O(1).
    """

    def __init__(self, req: SamplingRow, device: torch.device) -> None:
        self.device = device
        self.num_prompt_tokens = req.num_prompt_tokens
        self.num_tokens = 0
        self.where: dict[int, int] = {}  # token -> its slot
        self.ids = torch.zeros(16, dtype=torch.long, device=device)
        self.counts = torch.zeros(16, dtype=torch.float32, device=device)
        self.size = 0

    def extend(self, token_ids: list[int], vocab: int) -> None:
        start = self.num_tokens
        new_ids: list[int] = []
        new_counts: list[float] = []
        bumps: list[int] = []
        for offset, token in enumerate(token_ids[start:]):
            if not 0 <= token < vocab:
                raise IndexError(f"token id {token} is outside [0, {vocab})")
            is_output = start + offset >= self.num_prompt_tokens
            slot = self.where.get(token)
            if slot is None:
                self.where[token] = self.size + len(new_ids)
                new_ids.append(token)
                new_counts.append(1.0 if is_output else 0.0)
            elif slot >= self.size:  # first seen in this very extension
                new_counts[slot - self.size] += 1.0 if is_output else 0.0
            elif is_output:
                bumps.append(slot)
        if bumps:
            if len(bumps) == 1:
                self.counts[bumps[0]] += 1.0
            else:
                index = torch.tensor(bumps, dtype=torch.long, device=self.device)
                self.counts.index_put_((index,), torch.ones_like(index, dtype=torch.float32), True)
        if new_ids:
            end = self.size + len(new_ids)
            if end > self.ids.numel():
                capacity = max(2 * self.ids.numel(), end)
                self.ids = torch.cat([self.ids, self.ids.new_zeros(capacity - self.ids.numel())])
                self.counts = torch.cat(
                    [self.counts, self.counts.new_zeros(capacity - self.counts.numel())]
                )
            if len(new_ids) == 1:
                self.ids[self.size] = new_ids[0]
                self.counts[self.size] = new_counts[0]
            else:
                self.ids[self.size : end] = torch.tensor(new_ids, device=self.device)
                self.counts[self.size : end] = torch.tensor(new_counts, device=self.device)
            self.size = end
        self.num_tokens = len(token_ids)


def penalty_state(req: SamplingRow, vocab: int, device: torch.device) -> PenaltyState:
    """``req``'s penalty statistics, brought up to date with its tokens."""
    state = req.sampler_state
    if (
        not isinstance(state, PenaltyState)
        or state.num_tokens > len(req.token_ids)
        or state.device != device
    ):
        state = PenaltyState(req, device)
        req.sampler_state = state
    if state.num_tokens < len(req.token_ids):
        state.extend(req.token_ids, vocab)
    return state


def _apply_penalties(x: torch.Tensor, rows: list[int], reqs: list[SamplingRow]) -> None:
    """Repetition, frequency and presence penalties on ``x[rows]``, in place, touching only
    the tokens each row has seen (the others are unchanged by every penalty)."""
    vocab, device = x.shape[-1], x.device
    states = [penalty_state(reqs[i], vocab, device) for i in rows]
    sizes = [s.size for s in states]
    ids = torch.cat([s.ids[: s.size] for s in states])
    counts = torch.cat([s.counts[: s.size] for s in states])
    values = torch.tensor(
        [
            [
                reqs[i].params.repetition_penalty,
                reqs[i].params.frequency_penalty,
                reqs[i].params.presence_penalty,
            ]
            for i in rows
        ],
        dtype=torch.float32,
        device=device,
    )
    owner = torch.repeat_interleave(
        torch.arange(len(rows), device=device), torch.tensor(sizes, device=device)
    )
    rep, freq, pres = values[owner].unbind(dim=1)
    batch_rows = torch.tensor(rows, device=device)[owner]
    flat = x.view(-1)
    index = batch_rows * vocab + ids
    seen = flat[index]
    # A penalty of 1 (or 0) leaves a logit bit for bit as it was: x/1, x*1 and x-0 are exact.
    seen = torch.where(seen > 0, seen / rep, seen * rep)
    seen = seen - freq * counts - pres * (counts > 0)
    flat[index] = _finite(seen)


# ---- temperature and the masks ---------------------------------------------------------------
def _filter(x: torch.Tensor, reqs: list[SamplingRow], row_max: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks for random rows ``x`` (masked logits
    become -inf). Each mask keeps the most likely token, so a row with any finite logit keeps
    one. Every reduction spans a whole row, so a row's result never depends on its companions.

    Each row is shifted by its maximum (``row_max``) before the temperature divides it: every
    value is then <= 0, so no temperature can overflow it to +inf (no clamp pass needed), and
    the most likely token sits at exactly 0. Every mask and the draw are shift-invariant.
    """
    device = x.device
    vocab = x.shape[-1]
    params = [r.params for r in reqs]
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    shift = torch.where(row_max > float("-inf"), row_max, torch.zeros_like(row_max))
    x = (x - shift[:, None]).div_(temps[:, None])
    neg_inf = float("-inf")
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    top_k_rows = [i for i, k in enumerate(ks) if k < vocab and params[i].top_p >= 1.0]

    if top_k_rows:  # rows with top-k alone: the k-th largest value from one topk
        index = torch.tensor(top_k_rows, device=device)
        sub = x.index_select(0, index)
        row_ks = [ks[i] for i in top_k_rows]
        values = torch.topk(sub, max(row_ks), dim=-1).values
        kth = values.gather(1, torch.tensor(row_ks, device=device)[:, None] - 1)
        x.index_copy_(0, index, sub.masked_fill(sub < kth, neg_inf))

    if top_p_rows:  # top-p (and any top-k of the same rows), from the rows' largest values
        index = torch.tensor(top_p_rows, device=device)
        sub = x.index_select(0, index)
        row_ks = torch.tensor([ks[i] for i in top_p_rows], device=device)
        top_p = torch.tensor(
            [params[i].top_p for i in top_p_rows], dtype=torch.float32, device=device
        )
        x.index_copy_(0, index, sub.masked_fill(top_p_drop(sub, row_ks, top_p), neg_inf))

    min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if min_p_rows:
        index = torch.tensor(min_p_rows, device=device)
        sub = x.index_select(0, index)
        probs = torch.softmax(sub, dim=-1)
        min_p = torch.tensor(
            [params[i].min_p for i in min_p_rows], dtype=torch.float32, device=device
        )
        cut = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        x.index_copy_(0, index, sub.masked_fill(probs < cut, neg_inf))
    return x


def _has_filters(p: SamplingParams, vocab: int) -> bool:
    """Whether a random row needs ``_filter``'s masks (top-k or min-p; top-p alone is part of
    the draw)."""
    return 0 < p.top_k < vocab or p.min_p > 0.0


def _draw(
    x: torch.Tensor, rows: list[int], reqs: list[SamplingRow], row_max: torch.Tensor
) -> torch.Tensor:
    """One token for each of ``rows`` of ``x`` (the batch's logits, penalised and masked), by
    inverting the row's CDF at a uniform drawn from the request's own generator: one number
    per row and step (a tiny op, no host sync), then ``sample_rows`` (one C++ pass per row on
    a CPU). Rows with temperature and top-p alone are drawn straight from ``x``; rows with
    top-k or min-p from ``_filter``'s output (already shifted, divided by the temperature and
    masked, top-p included)."""
    device = x.device
    vocab = x.shape[-1]
    uniform = {
        i: torch.rand(1, generator=reqs[i].generator, device=device, dtype=torch.float64)
        for i in rows
    }
    plain: list[int] = []
    masked: list[int] = []
    for i in rows:
        (masked if _has_filters(reqs[i].params, vocab) else plain).append(i)
    drawn: list[tuple[list[int], torch.Tensor]] = []
    if plain:
        index = torch.tensor(plain, device=device)
        temps = torch.tensor(
            [reqs[i].params.temperature for i in plain], dtype=torch.float32, device=device
        )
        # A row with every entry masked (max -inf) fails anyway: shift it by 0, not by -inf.
        peak = row_max.index_select(0, index)
        peak = torch.where(peak > float("-inf"), peak, torch.zeros_like(peak))
        us = torch.cat([uniform[i] for i in plain])
        top_p = torch.tensor(
            [reqs[i].params.top_p for i in plain], dtype=torch.float32, device=device
        )
        drawn.append((plain, sample_rows(x, index, temps, peak, us, top_p)))
    if masked:
        index = torch.tensor(masked, device=device)
        sub = [reqs[i] for i in masked]
        filtered = _filter(x.index_select(0, index), sub, row_max.index_select(0, index))
        n = len(masked)
        ones = torch.ones(n, dtype=torch.float32, device=device)
        zeros = torch.zeros(n, dtype=torch.float32, device=device)  # each row's max, shifted
        us = torch.cat([uniform[i] for i in masked])
        arange = torch.arange(n, device=device)
        drawn.append((masked, sample_rows(filtered, arange, ones, zeros, us, ones)))
    if len(drawn) == 1:
        return drawn[0][1]
    position = {row: k for k, row in enumerate(rows)}
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    for group, got in drawn:
        tokens.index_copy_(0, torch.tensor([position[i] for i in group], device=device), got)
    return tokens


# ---- logprobs ---------------------------------------------------------------------------------
def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, ns: list[int]) -> list[dict[int, float]]:
    """Per row: the sampled token's logprob, then the top ``n`` (one host transfer)."""
    lp = torch.log_softmax(raw.float(), dim=-1).clamp_(min=LOGPROB_FLOOR)
    lp = torch.nan_to_num_(lp, nan=LOGPROB_FLOOR)
    chosen = lp.gather(1, tokens[:, None]).double()
    n_max = min(max(ns), lp.shape[-1])
    parts = [chosen]
    if n_max > 0:
        top = torch.topk(lp, n_max, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    rows = torch.cat(parts, dim=1).tolist()
    out = []
    for row, token, n in zip(rows, tokens.tolist(), ns, strict=True):
        entry = {token: row[0]}
        n = min(n, n_max)
        entry.update(
            zip((int(t) for t in row[1 : 1 + n]), row[1 + n_max : 1 + n_max + n], strict=True)
        )
        out.append(entry)
    return out


# ---- the batch ---------------------------------------------------------------------------------
def _finite_with_row_max(logits: torch.Tensor, writable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_finite(logits)`` in float32 and each row's maximum. ``_finite`` costs two passes
    over the batch's logits (~3 ms at 64 rows of 49k here) and changes nothing when no row's
    maximum is NaN (a max propagates NaN) or above the clamp bound, the usual case; it runs
    only when one is. The result is a copy when ``writable`` (the caller edits it in place, and
    logprobs read the raw logits later); otherwise it may be ``logits`` itself."""
    x = logits.float().contiguous()
    row_max = x.amax(dim=-1)
    peak = row_max.amax()
    if bool(peak.isnan() | (peak > _MAX_LOGIT)):
        x = _finite(x)
        return x, x.amax(dim=-1)
    if writable and x.data_ptr() == logits.data_ptr():
        x = x.clone()
    return x, row_max


def _sample_batch(
    logits: torch.Tensor, reqs: list[SamplingRow], eos_token_ids: list[int]
) -> list[RowResult]:
    """Every row of ``logits [B, V]`` in one pass: a fixed number of batched ops whatever the
    mix of parameters, one host transfer for the tokens (and one for logprobs, if asked)."""
    device = logits.device
    params = [r.params for r in reqs]
    penalised = [i for i, p in enumerate(params) if p.needs_penalties]
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, (req, p) in enumerate(zip(reqs, params, strict=True)):
        if req.num_output_tokens < p.min_tokens:
            banned = [*([] if p.ignore_eos else eos_token_ids), *(p.stop_token_ids or [])]
            ban_rows += [i] * len(banned)
            ban_cols += banned

    x, row_max = _finite_with_row_max(logits, writable=bool(penalised or ban_rows))
    if penalised:
        _apply_penalties(x, penalised, reqs)
    if ban_rows:
        x[torch.tensor(ban_rows, device=device), torch.tensor(ban_cols, device=device)] = float(
            "-inf"
        )
    if penalised or ban_rows:
        row_max = x.amax(dim=-1)  # exact: a max, no rounding
    selectable = row_max > float("-inf")
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        tokens = argmax_rows(x)
    elif len(random_rows) == len(reqs):
        tokens = _draw(x, random_rows, reqs, row_max)
    else:
        tokens = argmax_rows(x)  # greedy rows: the argmax of exactly these values
        index = torch.tensor(random_rows, device=device)
        tokens.index_copy_(0, index, _draw(x, random_rows, reqs, row_max))

    host = torch.stack([tokens, selectable.long()]).tolist()
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None and host[1][i]]
    entries: dict[int, dict[int, float]] = {}
    if lp_rows:
        index = torch.tensor(lp_rows, device=device)
        got = _logprobs(
            logits.index_select(0, index),
            tokens.index_select(0, index),
            [params[i].logprobs for i in lp_rows],  # type: ignore[misc]
        )
        entries = dict(zip(lp_rows, got, strict=True))
    results: list[RowResult] = []
    for i, (token, ok) in enumerate(zip(*host, strict=True)):
        if not ok:
            results.append(ValueError("every token was masked: no finite logit to sample from"))
        else:
            results.append((token, entries.get(i)))
    return results


def sample_row(row: torch.Tensor, req: SamplingRow, eos_token_ids: list[int]) -> RowResult:
    """One request's next token and its logprobs (``None`` unless asked for); the batched
    path with a batch of one, so it gives exactly what that row gets in any batch."""
    try:
        return _sample_batch(row[None], [req], eos_token_ids)[0]
    except Exception as exc:
        return exc


def sample(
    logits: torch.Tensor, reqs: list[SamplingRow], eos_token_ids: list[int]
) -> list[RowResult]:
    """Next token (and top-N logprobs where asked) for each row of ``logits [B, V]``.

    A row whose processing raises yields its exception instead of a token: one request's
    failure never decides another's token.
    """
    if all(r.plain_greedy for r in reqs):
        return [(t, None) for t in argmax_rows(logits).tolist()]
    try:
        return _sample_batch(logits, reqs, eos_token_ids)
    except Exception as exc:
        if len(reqs) == 1:
            return [exc]
    # Some row's own processing raised: find which, one row at a time (rare; the rows that
    # are fine get exactly the tokens they would have had in the batch).
    return [sample_row(row, req, eos_token_ids) for row, req in zip(logits, reqs, strict=True)]
