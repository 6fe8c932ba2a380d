"""What routers in front of kvmesh ask their workers: vLLM's ``/tokenize`` and ``/detokenize``,
SGLang's ``/get_load``.

vllm-router's cache-aware policy matches prefixes of token ids, which it gets from each worker
for each request (``POST /tokenize``, as vLLM answers it); sglang-router's ``power_of_two``
polls ``GET /get_load``. Token ids come from the model's own ``InputProcessor``, the one that
tokenises generation requests, so they are exactly what a replica is given for the same prompt
or conversation (chat template, tools and control-token handling included). Unlike a
generation request, a prompt longer than the context is not refused: the answer's ``count``
and ``max_model_len`` say so, as vLLM's do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from kvmesh.replicas.input_processor import InputError
from kvmesh.router.errors import APIError
from kvmesh.router.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from kvmesh.router.tokenization import ModelInfo

if TYPE_CHECKING:
    from kvmesh.router.ingress import Ingress

T = TypeVar("T")


def _checked(fn: Callable[[], T]) -> T:
    """``fn()``, with the input processor's refusals as the API errors they stand for."""
    try:
        return fn()
    except InputError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None


def _no_tokenizer(param: str) -> APIError:
    return APIError(400, f"{param}: this model has no tokenizer", param=param, code="invalid_value")


def token_ids(info: ModelInfo, req: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
    """The ids a replica is given for this prompt or conversation."""
    if isinstance(req, TokenizeChatRequest):
        conversation, tools = req.conversation(), req.tool_dicts()
        return _checked(lambda: info.inputs.encode_chat(conversation, tools))[1]
    if req.add_special_tokens:  # as /v1/completions tokenises a prompt
        return _checked(lambda: info.inputs.tokenize(req.prompt))[1]
    if info.tokenizer is None:
        raise _no_tokenizer("prompt")
    return list(info.tokenizer.encode(req.prompt, add_special_tokens=False))


async def tokenize(ing: Ingress, request: Request) -> dict[str, Any]:
    req = (await ing.parse(request, TokenizeRequest)).root
    info = ing.infos[ing.table.resolve(req.model)]

    def work() -> dict[str, Any]:
        # In a worker thread: a long conversation costs milliseconds to seconds of CPU.
        ids = token_ids(info, req)
        strs = info.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": info.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    return await asyncio.to_thread(work)


async def detokenize(ing: Ingress, request: Request) -> dict[str, Any]:
    req: DetokenizeRequest = await ing.parse(request, DetokenizeRequest)
    info = ing.infos[ing.table.resolve(req.model)]
    vocab = info.inputs.vocab_size
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"tokens: token id {bad} is outside [0, {vocab})",
            param="tokens",
            code="invalid_value",
        )
    if info.tokenizer is None:
        raise _no_tokenizer("tokens")
    return {"prompt": await asyncio.to_thread(info.tokenizer.decode, req.tokens)}


async def load(ing: Ingress) -> list[dict[str, Any]]:
    """SGLang's ``/get_load``: one entry per replica (SGLang: per data-parallel rank), which
    sglang-router sums into the worker's load (``num_tokens``). ``num_tokens`` as SGLang counts
    it: tokens the running requests hold in the KV cache, plus prompt tokens queued for
    prefill (blocks held by requests times the block size, plus the engine's
    ``pending_prefill_tokens``); cached blocks that no request holds are free."""
    out = []
    for snap in await ing.replica_snapshot():
        info = ing.infos.get(snap["model"])
        if info is None:
            continue
        s = snap["stats"]
        running = int(s.get("num_requests_running", 0))
        waiting = int(s.get("num_requests_waiting", 0))
        held = int(s.get("kv_blocks_total", 0)) - int(s.get("kv_blocks_free", 0))
        out.append(
            {
                "dp_rank": len(out),
                "num_reqs": running + waiting,
                "num_waiting_reqs": waiting,
                "num_tokens": max(held, 0) * info.block_size
                + int(s.get("pending_prefill_tokens", 0)),
                "model": snap["model"],
                "replica": snap["replica"],
            }
        )
    return out
