"""Turn each sequence's logits into its next token: penalties, temperature, top-k/p, min-p.

Greedy rows take the argmax. Random rows draw with the request's own ``torch.Generator``, so a
seeded request gives the same tokens whatever else shares its batch. Logprobs are those of the
model's raw distribution (before penalties and temperature), as vLLM reports them.

Numerical safety: every value inside the accepted parameter ranges must give a token, never
NaN or inf. Tiny temperatures or repetition penalties would overflow float32 logits to inf
(then ``softmax`` gives NaN and ``multinomial`` raises), so temperatures below
``SAMPLING_EPS`` sample greedily (``SamplingParams.greedy``, as vLLM does) and logits are
clamped to finite values after each transform; masked entries stay ``-inf`` and at least
one entry always survives the masks.
Returned logprobs are finite: ``-inf`` is reported as ``LOGPROB_FLOOR`` (as OpenAI does), so
every body the API sends is strict JSON.

Faults stay with their request: ``sample`` returns, per row, either ``(token, logprobs)`` or
the exception that row raised, and the engine fails only that request.
"""

from __future__ import annotations

import torch

from kvmesh.replicas.request import Request

LOGPROB_FLOOR = -9999.0
"""The logprob reported for tokens of probability zero (finite, unlike ``-inf``)."""
_MAX_LOGIT = torch.finfo(torch.float32).max / 4
"""Clamp bound for transformed logits: finite, and a difference of two stays finite."""

RowResult = tuple[int, dict[int, float] | None] | Exception


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN becomes masked (-inf), +inf the largest finite value; -inf stays masked."""
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=_MAX_LOGIT, neginf=float("-inf")
    ).clamp_(max=_MAX_LOGIT)


def _apply_penalties(logits: torch.Tensor, req: Request) -> torch.Tensor:
    p = req.params
    vocab = logits.shape[-1]
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(req.token_ids, device=logits.device)] = True
        penalised = torch.where(
            logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if (p.frequency_penalty or p.presence_penalty) and req.num_output_tokens:
        out_ids = torch.tensor(req.output_token_ids, device=logits.device)
        counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return _finite(logits)


def _filter(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked logits become -inf).

    Each mask keeps the most likely token, so a row with any finite logit keeps one.
    """
    p = req.params
    logits = _finite(logits / p.temperature)
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p (always keep the first).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def _topn_logprobs(raw: torch.Tensor, token: int, n: int) -> dict[int, float]:
    lp = torch.log_softmax(raw.float(), dim=-1).clamp_(min=LOGPROB_FLOOR)
    lp = torch.nan_to_num(lp, nan=LOGPROB_FLOOR)
    entry = {token: float(lp[token])}
    if n > 0:
        top = torch.topk(lp, n)
        entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return entry


def sample_row(row: torch.Tensor, req: Request, eos_token_ids: list[int]) -> RowResult:
    """One request's next token and its logprobs (``None`` unless asked for)."""
    p = req.params
    raw = row
    row = _finite(row.float())
    if p.needs_penalties:
        row = _apply_penalties(row, req)
    if req.num_output_tokens < p.min_tokens:
        banned = [*([] if p.ignore_eos else eos_token_ids), *(p.stop_token_ids or [])]
        if banned:
            row = row.clone()
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    if not bool(torch.isfinite(row).any()):
        raise ValueError("every token was masked: no finite logit to sample from")
    if p.greedy:
        token = int(row.argmax())
    else:
        probs = torch.softmax(_filter(row, req), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=req.generator))
    lp = _topn_logprobs(raw, token, p.logprobs) if p.logprobs is not None else None
    return token, lp


def sample(logits: torch.Tensor, reqs: list[Request], eos_token_ids: list[int]) -> list[RowResult]:
    """Next token (and top-N logprobs where asked) for each row of ``logits [B, V]``.

    A row whose processing raises yields its exception instead of a token: one request's
    failure never decides another's token.
    """
    simple = all(
        r.params.greedy
        and not r.params.needs_penalties
        and r.params.logprobs is None
        and r.params.min_tokens == 0
        for r in reqs
    )
    if simple:
        return [(t, None) for t in logits.argmax(dim=-1).tolist()]
    results: list[RowResult] = []
    for row, req in zip(logits, reqs, strict=True):
        try:
            results.append(sample_row(row, req, eos_token_ids))
        except Exception as exc:  # this request's fault alone
            results.append(exc)
    return results
