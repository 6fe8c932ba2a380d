"""Which deployment serves a requested ``model``: a served name, or an alias split by weight.

An alias (``chat`` -> ``{chat-v1: 90, chat-v2: 10}``) is how a canary or an A/B test runs:
each request draws one version with probability proportional to its weight, independently, so
over many requests the split converges to the weights. Responses name the version that served.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from kvmesh.router.errors import APIError


class ModelTable:
    def __init__(
        self,
        models: list[str],
        aliases: Mapping[str, Mapping[str, float]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.models = list(models)
        self.aliases = {a: dict(w) for a, w in (aliases or {}).items()}
        for alias, weights in self.aliases.items():
            unknown = sorted(set(weights) - set(self.models))
            if unknown:
                raise ValueError(f"alias {alias!r} points at unknown models {unknown}")
            if not weights or any(w <= 0 for w in weights.values()):
                raise ValueError(f"alias {alias!r} needs positive weights")
        self._rng = rng or random.Random()

    def names(self) -> list[str]:
        """Everything a client may put in ``model``: served names, then aliases."""
        return [*self.models, *self.aliases]

    def resolve(self, name: str) -> str:
        """The served model for this request; 404 for a name nobody serves."""
        if name in self.aliases:
            weights = self.aliases[name]
            return self._rng.choices(list(weights), weights=list(weights.values()))[0]
        if name in self.models:
            return name
        raise APIError(
            404,
            f"the model {name!r} does not exist; available: {', '.join(self.names())}",
            param="model",
            code="model_not_found",
        )
