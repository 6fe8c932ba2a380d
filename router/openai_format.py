"""OpenAI response bodies and stream chunks, built from finished or partial generations.

Plain dicts rather than response models: the shapes are fixed by OpenAI's API, they are built
once per token on the hot path, and ``json.dumps`` of a dict is the cheapest way to bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kvmesh.router.response_cache import Generation

TokenText = Callable[[int], str]

_FINISH = {"stop": "stop", "length": "length"}


def finish_reason(reason: str | None) -> str | None:
    """Engine finish reasons as OpenAI names them (aborts never reach a client)."""
    return None if reason is None else _FINISH.get(reason, reason)


def usage(gens: list[Generation]) -> dict[str, Any]:
    prompt = sum(g.num_prompt_tokens for g in gens)
    completion = sum(len(g.token_ids) for g in gens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(g.num_cached_tokens for g in gens)},
    }


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:n]


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, float]],
    n: int,
    text_of: TokenText,
    offset: int = 0,
) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top alternatives as {text: logprob}."""
    tokens = [text_of(t) for t in token_ids]
    offsets, pos = [], offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [e.get(t) for t, e in zip(token_ids, entries, strict=True)],
        "top_logprobs": [{text_of(i): lp for i, lp in _top(e, n)} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], n: int, text_of: TokenText
) -> dict[str, Any]:
    """The chat shape: one object per token with its bytes and ``n`` top alternatives."""

    def item(token: int, lp: float | None) -> dict[str, Any]:
        text = text_of(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for t, e in zip(token_ids, entries, strict=True):
        entry = item(t, e.get(t))
        entry["top_logprobs"] = [item(i, lp) for i, lp in _top(e, n)]
        content.append(entry)
    return {"content": content}


def completion_body(
    rid: str,
    created: int,
    model: str,
    gens: list[Generation],
    logprobs: int | None,
    text_of: TokenText,
) -> dict[str, Any]:
    choices = []
    for i, g in enumerate(gens):
        lp = None
        if logprobs is not None and g.logprobs is not None:
            lp = completion_logprobs(g.token_ids, g.logprobs, logprobs, text_of)
        choices.append(
            {
                "index": i,
                "text": g.text,
                "logprobs": lp,
                "finish_reason": finish_reason(g.finish_reason),
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(gens),
    }


def chat_body(
    rid: str,
    created: int,
    model: str,
    gen: Generation,
    top_logprobs: int | None,
    text_of: TokenText,
) -> dict[str, Any]:
    lp = None
    if top_logprobs is not None and gen.logprobs is not None:
        lp = chat_logprobs(gen.token_ids, gen.logprobs, top_logprobs, text_of)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "logprobs": lp,
                "finish_reason": finish_reason(gen.finish_reason),
            }
        ],
        "usage": usage([gen]),
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    logprobs: dict | None,
    reason: str | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(reason),
            }
        ],
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    logprobs: dict | None,
    reason: str | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason(reason),
            }
        ],
    }


def usage_chunk(rid: str, created: int, model: str, obj: str, gens: list[Generation]) -> dict:
    """The extra last chunk ``stream_options.include_usage`` asks for: no choices, usage."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(gens),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
