"""The HTTP front door: an OpenAI-compatible API over the app's model deployments.

``Ingress`` is a plain class; ``cluster/app.py`` makes it a Serve deployment with
``serve.ingress()`` (Serve calls ``__serve_build_asgi_app__`` once the constructor has run).
Per request it authenticates, validates (strict pydantic), resolves ``model`` (alias splits
included), tokenises (chat template for chat), refuses prompts that cannot fit, then sends a
``ReplicaRequest`` carrying token ids and prefix-block hashes through the model's handle and
formats what streams back. The engine detokenises incrementally (it must, to find stop
strings), so chunks arrive with their text and the ingress only frames them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.wire import ReplicaChunk, ReplicaRequest
from kvmesh.router import openai_format as fmt
from kvmesh.router.auth import APIKeyAuth, keys_from_env
from kvmesh.router.errors import APIError, from_validation_error
from kvmesh.router.metrics import IngressMetrics, merge_expositions
from kvmesh.router.model_table import ModelTable
from kvmesh.router.protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.router.replica_client import ReplicaStream, open_stream
from kvmesh.router.response_cache import Generation, ResponseCache, cache_key
from kvmesh.router.routing import metrics as router_metrics
from kvmesh.router.streams import CachedStream, TokenSource, accumulate, merge
from kvmesh.router.tokenization import ModelInfo, load_model_info

log = logging.getLogger(__name__)

DEBUG_CRASH_HEADER = "x-kvmesh-debug-crash-after"


class IngressConfig(BaseModel):
    """What the ingress needs to know; ``cluster/config.py`` derives it from the app config."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: dict[str, dict[str, Any]] = Field(min_length=1)
    """Served name -> engine arguments (for the tokenizer, context length and block size)."""
    aliases: dict[str, dict[str, float]] = Field(default_factory=dict)
    api_keys: list[str] = Field(default_factory=list)
    response_cache_entries: int = Field(default=0, ge=0)
    """0 turns the response cache off."""
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    retry_after_s: int = Field(default=1, ge=0)
    replica_retries: int = Field(default=2, ge=0)
    debug_hooks: bool = False


class Ingress:
    def __init__(
        self,
        config: dict[str, Any],
        models: dict[str, Any],
        stats_hub: Any | None = None,
    ) -> None:
        self.config = IngressConfig.model_validate(config)
        self.infos: dict[str, ModelInfo] = {
            name: load_model_info(name, args) for name, args in self.config.models.items()
        }
        self.table = ModelTable(list(self.config.models), self.config.aliases)
        self.handles = models
        self.hub = stats_hub
        self.auth = APIKeyAuth([*self.config.api_keys, *keys_from_env()])
        n = self.config.response_cache_entries
        self.cache = ResponseCache(n) if n else None
        self.metrics = IngressMetrics()
        self.started = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # ---- request handling -----------------------------------------------------------------
    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        self.auth.check(request.headers.get("authorization"))
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is over {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body is over {limit} bytes", code="request_too_large")
        try:
            return schema.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    @staticmethod
    def sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.sampling_params()
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None

    def debug_crash_after(self, request: Request) -> int | None:
        value = request.headers.get(DEBUG_CRASH_HEADER)
        if not self.config.debug_hooks or value is None or not value.isdigit():
            return None
        return int(value)

    async def open_sources(
        self,
        request: Request,
        target: str,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        rid: str,
        arrival: float,
        cacheable: bool,
    ) -> list[TokenSource]:
        """One token source per prompt (a cache hit or an admitted replica stream)."""
        info = self.infos[target]
        crash_after = self.debug_crash_after(request)
        session_id = request.headers.get("x-session-id")
        cacheable = cacheable and self.cache is not None and crash_after is None

        async def open_one(i: int, text: str | None, ids: list[int]) -> TokenSource:
            if cacheable:
                hit = self.cache.get(cache_key(target, ids, params))  # type: ignore[union-attr]
                self.metrics.response_cache.labels(target, "hit" if hit else "miss").inc()
                if hit is not None:
                    return CachedStream(hit)
            req = ReplicaRequest(
                request_id=f"{rid}-{i}",
                model=target,
                prompt_token_ids=ids,
                params=params,
                block_hashes=info.block_hashes(ids),
                block_size=info.block_size,
                prompt=text,
                arrival_time=arrival,
                session_id=session_id,
                debug_crash_after=crash_after,
            )
            t_call = time.time()
            stream = await open_stream(
                self.handles[target],
                req,
                retries=self.config.replica_retries,
                retry_after_s=self.config.retry_after_s,
            )
            self.observe_admission(target, arrival, t_call, stream.admitted)
            return stream

        # One prompt at a time until admitted, then they all generate together. Serve gives
        # every handle call made while serving one HTTP request the same internal request id,
        # and a RequestRouter without FIFO fulfilment matches routed replicas to waiting calls
        # by that id: two calls waiting at once would leave one waiting forever.
        sources: list[TokenSource] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                sources.append(await open_one(i, text, ids))
        except BaseException:
            for source in sources:
                source.cancel()
            raise
        return sources

    def remember(self, target: str, prompts, params: SamplingParams, sources, gens) -> None:
        if self.cache is None:
            return
        for (_, ids), source, gen in zip(prompts, sources, gens, strict=True):
            if isinstance(source, ReplicaStream):
                self.cache.put(cache_key(target, ids, params), gen)

    def headers(self, target: str, sources: list[TokenSource], rid: str) -> dict[str, str]:
        replicas = list(dict.fromkeys(s.replica for s in sources))
        headers = {
            "x-kvmesh-replica": ",".join(replicas),
            "x-kvmesh-model-version": target,
            "x-kvmesh-request-id": rid,
        }
        if self.cache is not None:
            headers["x-kvmesh-cache"] = "hit" if all(s.cache_hit for s in sources) else "miss"
        return headers

    def observe_admission(
        self, target: str, arrival: float, t_call: float, admitted: ReplicaChunk
    ) -> None:
        """The headline ``ingress_to_engine`` and its parts: the ingress's own work
        (``ingress_handling``), Serve's routing and transport (``handle_to_replica``)."""
        if admitted.t_enqueued is None or admitted.t_received is None:
            return
        observe = self.metrics.overhead.labels
        observe(target, "ingress_to_engine").observe(max(admitted.t_enqueued - arrival, 0.0))
        observe(target, "ingress_handling").observe(max(t_call - arrival, 0.0))
        observe(target, "handle_to_replica").observe(max(admitted.t_received - t_call, 0.0))

    def observe_emit(self, target: str, chunk: ReplicaChunk) -> None:
        self.metrics.overhead.labels(target, "engine_to_sse").observe(
            max(time.time() - chunk.t_emit, 0.0)
        )

    @staticmethod
    async def collect(sources: list[TokenSource]) -> list[Generation]:
        gens = [Generation(replica=s.replica) for s in sources]
        try:
            async for i, chunk in merge(sources):
                accumulate(gens[i], chunk)
        finally:
            for source in sources:
                source.cancel()
        return gens

    # ---- /v1/completions ------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.time()
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        target = self.table.resolve(req.model)
        info = self.infos[target]
        params = self.sampling(req)
        prompts = [info.encode(p) for p in req.prompts()]
        rid = f"cmpl-{uuid.uuid4().hex}"
        sources = await self.open_sources(
            request, target, prompts, params, rid, arrival, req.deterministic
        )
        headers = self.headers(target, sources, rid)
        created = int(time.time())
        if req.stream:
            body = self.stream_completion(req, target, info, prompts, params, sources, rid, created)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        gens = await self.collect(sources)
        self.remember(target, prompts, params, sources, gens)
        out = fmt.completion_body(rid, created, target, gens, req.logprobs, info.token_text)
        return JSONResponse(out, headers=headers)

    def stream_completion(
        self,
        req: CompletionRequest,
        target: str,
        info: ModelInfo,
        prompts,
        params,
        sources: list[TokenSource],
        rid: str,
        created: int,
    ) -> AsyncIterator[bytes]:
        gens = [Generation(replica=s.replica) for s in sources]

        async def events() -> AsyncIterator[bytes]:
            async for i, chunk in merge(sources):
                offset = len(gens[i].text)
                accumulate(gens[i], chunk)
                lp = None
                if req.logprobs is not None and chunk.delta_logprobs:
                    lp = fmt.completion_logprobs(
                        chunk.delta_token_ids,
                        chunk.delta_logprobs,
                        req.logprobs,
                        info.token_text,
                        offset,
                    )
                if not (chunk.delta_text or lp or chunk.finish_reason):
                    continue
                data = fmt.sse(
                    fmt.completion_chunk(
                        rid, created, target, i, chunk.delta_text, lp, chunk.finish_reason
                    )
                )
                self.observe_emit(target, chunk)
                yield data
            if req.include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, created, target, "text_completion", gens))
            self.remember(target, prompts, params, sources, gens)

        return self.guarded_sse(rid, sources, events())

    @staticmethod
    async def guarded_sse(
        rid: str, sources: list[TokenSource], events: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """Every stream ends with ``[DONE]``; a failure becomes an SSE error event, never a
        silent stop, and the request's sources are cancelled however the stream ends
        (including a client disconnect)."""
        try:
            async for data in events:
                yield data
        except APIError as err:
            yield fmt.sse(err.body())
        except Exception as exc:
            log.exception("stream %s failed", rid)
            yield fmt.sse(APIError(500, f"internal error: {type(exc).__name__}").body())
        finally:
            for source in sources:
                source.cancel()
            await events.aclose()
        yield fmt.SSE_DONE

    # ---- /v1/chat/completions ------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        arrival = time.time()
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        target = self.table.resolve(req.model)
        info = self.infos[target]
        params = self.sampling(req)
        prompts = [info.encode_chat(req.conversation())]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        sources = await self.open_sources(
            request, target, prompts, params, rid, arrival, req.deterministic
        )
        headers = self.headers(target, sources, rid)
        created = int(time.time())
        top = params.logprobs
        if req.stream:
            body = self.stream_chat(req, target, info, prompts, params, sources, rid, created)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        gens = await self.collect(sources)
        self.remember(target, prompts, params, sources, gens)
        return JSONResponse(
            fmt.chat_body(rid, created, target, gens[0], top, info.token_text), headers=headers
        )

    def stream_chat(
        self,
        req: ChatCompletionRequest,
        target: str,
        info: ModelInfo,
        prompts,
        params,
        sources: list[TokenSource],
        rid: str,
        created: int,
    ) -> AsyncIterator[bytes]:
        gen = Generation(replica=sources[0].replica)
        top = params.logprobs

        async def events() -> AsyncIterator[bytes]:
            yield fmt.sse(
                fmt.chat_chunk(
                    rid, created, target, {"role": "assistant", "content": ""}, None, None
                )
            )
            async for _, chunk in merge(sources):
                accumulate(gen, chunk)
                lp = None
                if top is not None and chunk.delta_logprobs:
                    lp = fmt.chat_logprobs(
                        chunk.delta_token_ids, chunk.delta_logprobs, top, info.token_text
                    )
                if chunk.delta_text or lp:
                    data = fmt.sse(
                        fmt.chat_chunk(
                            rid, created, target, {"content": chunk.delta_text}, lp, None
                        )
                    )
                    self.observe_emit(target, chunk)
                    yield data
                if chunk.finish_reason is not None:
                    yield fmt.sse(
                        fmt.chat_chunk(rid, created, target, {}, None, chunk.finish_reason)
                    )
            if req.include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, created, target, "chat.completion.chunk", [gen]))
            self.remember(target, prompts, params, sources, [gen])

        return self.guarded_sse(rid, sources, events())

    # ---- everything else ------------------------------------------------------------------
    def models_body(self) -> dict[str, Any]:
        data = []
        for name in self.table.names():
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": self.started,
                "owned_by": "kvmesh",
            }
            if name in self.infos:
                entry["max_model_len"] = self.infos[name].max_model_len
            else:
                entry["versions"] = self.table.aliases[name]
            data.append(entry)
        return {"object": "list", "data": data}

    async def replica_snapshot(self) -> list[dict[str, Any]]:
        if self.hub is None:
            return []
        return await self.hub.snapshot.remote()

    async def ready(self) -> tuple[bool, dict[str, int]]:
        counts = dict.fromkeys(self.config.models, 0)
        for snap in await self.replica_snapshot():
            if snap["model"] in counts:
                counts[snap["model"]] += 1
        return all(counts.values()), counts

    async def metrics_text(self) -> str:
        texts = [self.metrics.render(), router_metrics.render()]
        texts.extend(s["metrics_text"] for s in await self.replica_snapshot())
        return merge_expositions(texts)


def build_api(ing: Ingress) -> FastAPI:
    app = FastAPI(title="kvmesh", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(request: Request, err: APIError) -> JSONResponse:
        ing.metrics.requests.labels(request.url.path, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}"))

    def ok(request: Request, response: Response) -> Response:
        ing.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return ok(request, await ing.completions(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return ok(request, await ing.chat(request))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        return ok(request, JSONResponse(ing.models_body()))

    @app.get("/health")
    async def health(request: Request) -> Response:
        return ok(request, JSONResponse({"status": "ok"}))

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        is_ready, counts = await ing.ready()
        if not is_ready:
            missing = sorted(m for m, n in counts.items() if not n)
            raise APIError(
                503,
                f"models not loaded yet: {', '.join(missing)}",
                code="not_ready",
                retry_after_s=ing.config.retry_after_s,
            )
        return ok(request, JSONResponse({"status": "ready", "replicas": counts}))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        text = await ing.metrics_text()
        return ok(request, PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST))

    @app.get("/debug/replicas")
    async def debug_replicas(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        snaps = await ing.replica_snapshot()
        body = [{k: v for k, v in s.items() if k != "metrics_text"} for s in snaps]
        return ok(request, JSONResponse(body))

    return app
