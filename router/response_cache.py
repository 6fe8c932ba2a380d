"""An optional LRU of finished responses for deterministic requests.

A request is deterministic when it is greedy (temperature 0) or seeded: the engine then gives
the same tokens for the same model version, prompt and parameters, whatever else shares its
batch. The key is exactly that triple, so a hit returns what the replica would have produced.
Off by default: a cache trades memory in the ingress for skipping whole generations, and only
pays where clients repeat themselves.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from kvmesh.replicas.sampling_params import SamplingParams


@dataclass
class Generation:
    """One finished generation, as the ingress formats it (and as the cache keeps it)."""

    replica: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


def cache_key(model: str, token_ids: list[int], params: SamplingParams) -> Hashable:
    values = tuple(
        (f.name, repr(getattr(params, f.name))) for f in dataclasses.fields(params) if f.init
    )
    return (model, tuple(token_ids), values)


def approx_bytes(key: Hashable, gen: Generation) -> int:
    """What an entry holds in memory, roughly: Python ints in lists cost ~36 bytes each, a
    logprobs entry ~100 per alternative. Generous on purpose: the bound must hold."""
    _, prompt_ids, _ = key  # type: ignore[misc]
    size = 512 + 4 * len(gen.text) + 36 * (len(prompt_ids) + len(gen.token_ids))
    if gen.logprobs:
        size += sum(100 * len(entry) + 64 for entry in gen.logprobs)
    return size


class ResponseCache:
    """LRU bounded both in entries and in (approximate) bytes: long prompts and outputs
    cannot grow the ingress without bound however few entries there are."""

    def __init__(self, max_entries: int, max_bytes: int = 64 << 20) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Generation, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Generation | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, gen: Generation) -> None:
        if gen.finish_reason not in ("stop", "length"):
            return  # only complete generations are worth replaying
        size = approx_bytes(key, gen)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.num_bytes -= old[1]
        self._entries[key] = (gen, size)
        self.num_bytes += size
        while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.num_bytes -= dropped
