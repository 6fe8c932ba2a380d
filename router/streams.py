"""Token sources the ingress formats: a replica stream, a cached generation, or several merged.

A completions request with several prompts fans out into one source per prompt; ``merge``
interleaves their chunks as they arrive, tagged with the prompt's index (the choice index).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from kvmesh.replicas.serve_messages import ReplicaChunk
from kvmesh.router.response_cache import Generation


class TokenSource(Protocol):
    replica: str
    cache_hit: bool

    def __aiter__(self) -> AsyncIterator[ReplicaChunk]: ...

    def cancel(self) -> None: ...


class CachedStream:
    """A response-cache hit, replayed as one chunk."""

    cache_hit = True

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.replica = gen.replica

    async def __aiter__(self) -> AsyncIterator[ReplicaChunk]:
        g = self.gen
        yield ReplicaChunk(
            replica=g.replica,
            delta_text=g.text,
            delta_token_ids=list(g.token_ids),
            delta_logprobs=g.logprobs,
            finish_reason=g.finish_reason,
            num_prompt_tokens=g.num_prompt_tokens,
            num_cached_tokens=g.num_cached_tokens,
            num_output_tokens=len(g.token_ids),
            t_emit=time.time(),
        )

    def cancel(self) -> None:
        pass


class GenerationBuilder:
    """Folds a stream's chunks into the ``Generation`` it adds up to, in amortised O(1) per
    chunk: text pieces, token ids and logprobs are appended to lists and the text is joined
    once, in ``build`` (appending to a ``str`` field would copy the text so far every time).
    """

    def __init__(self, replica: str = "") -> None:
        self.replica = replica
        self._pieces: list[str] = []
        self.text_length = 0
        """Characters of text so far (a completion's logprob text offsets)."""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self._built: Generation | None = None

    def add(self, chunk: ReplicaChunk) -> None:
        """Fold one chunk in."""
        self._built = None
        self.replica = chunk.replica or self.replica
        if chunk.delta_text:
            self._pieces.append(chunk.delta_text)
            self.text_length += len(chunk.delta_text)
        self.token_ids.extend(chunk.delta_token_ids)
        if chunk.delta_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(chunk.delta_logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        self.num_prompt_tokens = chunk.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, chunk.num_cached_tokens)

    def build(self) -> Generation:
        """The generation so far (the text joined once; cached until the next ``add``)."""
        if self._built is None:
            if len(self._pieces) > 1:
                self._pieces[:] = ["".join(self._pieces)]
            self._built = Generation(
                replica=self.replica,
                text=self._pieces[0] if self._pieces else "",
                token_ids=self.token_ids,
                logprobs=self.logprobs,
                finish_reason=self.finish_reason,
                num_prompt_tokens=self.num_prompt_tokens,
                num_cached_tokens=self.num_cached_tokens,
            )
        return self._built


_DONE = object()


async def merge(sources: Sequence[TokenSource]) -> AsyncIterator[tuple[int, ReplicaChunk]]:
    """Chunks of every source as they come, as ``(source index, chunk)``; first error raises."""
    if len(sources) == 1:
        async for chunk in sources[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, source: TokenSource) -> None:
        try:
            async for chunk in source:
                queue.put_nowait((i, chunk))
            queue.put_nowait((i, _DONE))
        except Exception as exc:  # re-raised in the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        remaining = len(sources)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
