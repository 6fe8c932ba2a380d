"""What the ingress hands the router with each request, and how the router finds it.

The router sees the ``DeploymentHandle`` call's arguments. It looks, in the positional
arguments and then the keyword values, for the first object with either

* ``prompt_block_hashes`` (a :class:`RoutingHint`), or
* ``block_hashes`` (the ingress's ``ReplicaRequest`` of :mod:`kvmesh.replicas.serve_messages`),

both a ``list[bytes]`` of ``BlockHasher.for_model(model, block_size).hash_blocks(prompt_ids)``.
The prompt length comes from ``num_prompt_tokens`` or ``len(prompt_token_ids)``; the session
from ``session_id`` on that object or, failing that, the handle's
``.options(session_id=...)`` (the ``x-session-id`` header).

Before the request is sent, the router writes ``router_id`` and ``router_seq`` onto that object
when it has those attributes (both classes here do, or should): the replica passes the object
to :meth:`CacheReporter.on_request`, and its reports acknowledge the request, which lets every
router count exactly the load that the replica's report does not include yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmesh.replicas.block_hash import BlockHasher


@dataclass
class RoutingHint:
    """A request's routing inputs, for callers that do not send a ``ReplicaRequest``."""

    prompt_block_hashes: list[bytes] = field(default_factory=list)
    num_prompt_tokens: int = 0
    session_id: str | None = None
    router_id: str | None = None
    """Written by the router."""
    router_seq: int = 0
    """Written by the router."""

    @classmethod
    def from_token_ids(
        cls,
        token_ids: Sequence[int],
        model_name: str,
        block_size: int = 16,
        session_id: str | None = None,
    ) -> RoutingHint:
        """Hash the prompt exactly as the engine names its blocks (the model's hasher)."""
        hashes = BlockHasher.for_model(model_name, block_size).hash_blocks(token_ids)
        return cls(hashes, len(token_ids), session_id)


@dataclass(frozen=True)
class RouteInputs:
    """The parts of a request the router uses, found by :func:`find_route_inputs`."""

    block_hashes: Sequence[bytes]
    num_prompt_tokens: int
    session_id: str | None
    carrier: Any
    """The object that carried them (stamped with router_id / router_seq)."""


def find_route_inputs(
    args: Iterable[Any], kwargs: Mapping[str, Any] | None, block_size: int
) -> RouteInputs | None:
    """The routing inputs in a handle call's arguments, or None if it carries none."""
    values = [*args, *(kwargs or {}).values()]
    for obj in values:
        hashes = getattr(obj, "prompt_block_hashes", None)
        if hashes is None:
            hashes = getattr(obj, "block_hashes", None)
        if hashes is None or isinstance(obj, (str, bytes)):
            continue
        num_tokens = getattr(obj, "num_prompt_tokens", 0) or len(
            getattr(obj, "prompt_token_ids", None) or ()
        )
        if not num_tokens:
            num_tokens = len(hashes) * block_size
        session = getattr(obj, "session_id", None) or None
        return RouteInputs(list(hashes), int(num_tokens), session, obj)
    return None


def stamp(carrier: Any, router_id: str, seq: int) -> bool:
    """Write the router's stamp onto the request object if it has the fields."""
    if hasattr(carrier, "router_id") and hasattr(carrier, "router_seq"):
        try:
            carrier.router_id = router_id
            carrier.router_seq = seq
        except (AttributeError, TypeError):  # frozen or slotted without the fields
            return False
        return True
    return False
