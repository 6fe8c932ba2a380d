"""What travels between the ingress and a model replica through a Serve ``DeploymentHandle``.

The ingress calls ``handle.options(stream=True).generate.remote(ReplicaRequest(...))`` and
iterates the ``ReplicaChunk`` s the replica yields. The request object is the handle call's only
positional argument, so a custom ``RequestRouter`` finds it at ``pending_request.args[0]`` and
can read ``prompt_token_ids`` and ``block_hashes`` (the prefix-block hashes of
:mod:`kvmesh.replicas.block_hash`) without re-tokenising. It also carries ``prompt`` (text) so
routers that match on text, such as Ray's ``PrefixCacheAffinityRouter``, work unchanged.

Both types are plain dataclasses: they pickle cheaply and need no Ray or FastAPI to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvmesh.replicas.block_hash import BlockHash
from kvmesh.replicas.sampling_params import SamplingParams


@dataclass
class ReplicaRequest:
    request_id: str
    model: str
    """The served model name (one deployment), also the block-hash extra key."""
    prompt_token_ids: list[int]
    params: SamplingParams
    block_hashes: list[BlockHash] = field(default_factory=list)
    """``hash_block_tokens(prompt_token_ids, block_size, extra_keys=(model,))``."""
    block_size: int = 16
    prompt: str | None = None
    """The prompt as text when there is one (chat: the templated text)."""
    arrival_time: float = 0.0
    """Wall-clock time the HTTP request reached the ingress (serving-overhead measurement)."""
    session_id: str | None = None
    """The client's ``x-session-id``, for routers that keep a conversation on one replica."""
    router_id: str | None = None
    """Written by kvmesh's prefix-aware router before sending; acknowledged in cache reports."""
    router_seq: int = 0
    """Written by kvmesh's prefix-aware router (see ``router/routing/hint.py``)."""
    debug_crash_after: int | None = None
    """Test-only: the replica exits after streaming this many token chunks (needs debug hooks)."""
    debug_fault: Literal["request", "engine"] | None = None
    """Test-only (needs debug hooks): ``request`` makes this request's own processing raise in
    the engine; ``engine`` makes the engine's next model step raise (the loop dies)."""


ErrorKind = Literal[
    "bad_request", "overloaded", "shutting_down", "engine_dead", "request_failed", "internal"
]


@dataclass
class ReplicaError:
    """A failure the replica reports as data, so the ingress maps it to an HTTP status."""

    kind: ErrorKind
    message: str


@dataclass
class ReplicaChunk:
    """One item of a replica's stream.

    The first chunk of every stream is ``admitted`` (the engine accepted the request; no tokens
    yet) or an error. Then come token chunks; the last one has ``finish_reason`` set.
    """

    replica: str
    admitted: bool = False
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    t_received: float | None = None
    """Wall-clock time the replica's ``generate`` started (admitted chunk)."""
    t_enqueued: float | None = None
    """Wall-clock time the replica handed the request to the engine (admitted chunk)."""
    t_emit: float = 0.0
    """Wall-clock time the replica received these tokens from the engine."""
    error: ReplicaError | None = None
