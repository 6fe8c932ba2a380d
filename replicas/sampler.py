"""Turn each sequence's logits into its next token: penalties, temperature, top-k/p, min-p.

Greedy rows take the argmax. Random rows draw with the request's own ``torch.Generator``, so a
seeded request gives the same tokens whatever else shares its batch. Logprobs are those of the
model's raw distribution (before penalties and temperature), as vLLM reports them.
"""

from __future__ import annotations

import torch

from kvmesh.replicas.request import Request


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
    return logits


def _filter(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked logits become -inf)."""
    p = req.params
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p (always keep the first).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, reqs: list[Request], eos_token_ids: list[int]
) -> tuple[list[int], list[dict[int, float] | None]]:
    """Next token (and top-N logprobs where asked) for each row of ``logits [B, V]``."""
    simple = all(
        r.params.greedy
        and not r.params.needs_penalties
        and r.params.logprobs is None
        and r.params.min_tokens == 0
        for r in reqs
    )
    if simple:
        return logits.argmax(dim=-1).tolist(), [None] * len(reqs)

    tokens: list[int] = []
    logprobs: list[dict[int, float] | None] = []
    for row, req in zip(logits, reqs, strict=True):
        p = req.params
        raw = row
        if p.needs_penalties:
            row = _apply_penalties(row, req)
        if req.num_output_tokens < p.min_tokens:
            banned = [*([] if p.ignore_eos else eos_token_ids), *(p.stop_token_ids or [])]
            if banned:
                row = row.clone()
                row[torch.tensor(banned, device=row.device)] = float("-inf")
        if p.greedy:
            token = int(row.argmax())
        else:
            probs = torch.softmax(_filter(row, req), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=req.generator))
        tokens.append(token)
        if p.logprobs is not None:
            lp = torch.log_softmax(raw, dim=-1)
            entry = {token: float(lp[token])}
            if p.logprobs > 0:
                top = torch.topk(lp, p.logprobs)
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs
