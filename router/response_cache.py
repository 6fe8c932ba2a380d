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


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Generation] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Generation | None:
        gen = self._entries.get(key)
        if gen is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return gen

    def put(self, key: Hashable, gen: Generation) -> None:
        if gen.finish_reason not in ("stop", "length"):
            return  # only complete generations are worth replaying
        self._entries[key] = gen
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
