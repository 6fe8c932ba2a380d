"""Per-request limits the ingress enforces before a request costs a replica anything.

Each limit bounds what one request can make the server hold or compute: bytes read, prompts
fanned out, prompt tokens tokenised and prefilled. A request over a limit is refused with a
400 or 413 whose message names the limit (and its key in the config's ``limits:`` section).
Fixed caps on a request's shape (stop strings, messages, content parts) live in
``router.protocol``; API keys in ``router.auth``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.router.errors import APIError

MAX_SESSION_ID_CHARS = 256
"""``x-session-id`` values are kept in the routers' session maps: bound each entry."""


class RequestLimits(BaseModel):
    """The ``limits:`` section of the app config."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    """Request body size; read incrementally and refused as soon as it is passed."""
    max_prompts_per_request: int = Field(default=64, ge=1, le=1024)
    """Prompts in one /v1/completions list (each becomes its own generation)."""
    max_prompt_tokens_per_request: int = Field(default=262_144, ge=1)
    """Prompt tokens over all of one request's prompts."""
    retry_after_s: int = Field(default=1, ge=0)
    """``Retry-After`` sent with 429 and 503."""


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes: a declared
    ``Content-Length`` over the limit is refused before reading, and a chunked body of
    unknown length while it streams in, so no client makes the ingress buffer more."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body is over {limit} bytes (limits.max_request_bytes)",
        code="request_too_large",
    )


def check_prompt_count(limits: RequestLimits, count: int, replica_cap: int | None) -> None:
    """Before tokenising: a list of prompts is refused without encoding any of them.

    ``replica_cap``: the model's ``max_pending_requests``; a request's prompts all run on one
    replica at once, so more than that could never be admitted.
    """
    cap, name = limits.max_prompts_per_request, "limits.max_prompts_per_request"
    if replica_cap is not None and replica_cap < cap:
        cap, name = replica_cap, "the model's max_pending_requests"
    if count > cap:
        raise APIError(
            400,
            f"prompt: {count} prompts in one request; at most {cap} ({name})",
            param="prompt",
            code="too_many_prompts",
        )


def check_prompt_tokens(limits: RequestLimits, total: int) -> None:
    if total > limits.max_prompt_tokens_per_request:
        raise APIError(
            413,
            f"prompt: {total} prompt tokens in one request; at most "
            f"{limits.max_prompt_tokens_per_request} (limits.max_prompt_tokens_per_request)",
            param="prompt",
            code="too_many_prompt_tokens",
        )


def session_id(value: str | None) -> str | None:
    if value is not None and len(value) > MAX_SESSION_ID_CHARS:
        raise APIError(
            400,
            f"x-session-id is {len(value)} characters; at most {MAX_SESSION_ID_CHARS}",
            param="x-session-id",
            code="invalid_value",
        )
    return value or None
