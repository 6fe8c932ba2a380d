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

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.serve_messages import ReplicaChunk, ReplicaRequest
from kvmesh.router import autoscaler_reports, limits, tokenize_api, tool_output
from kvmesh.router import openai_format as fmt
from kvmesh.router.auth import APIKeyAuth, keys_from_env, keys_from_file
from kvmesh.router.errors import APIError, from_validation_error
from kvmesh.router.ingress_metrics import IngressMetrics, merge_expositions
from kvmesh.router.limits import RequestLimits, check_prompt_tokens, read_body
from kvmesh.router.model_table import ModelTable
from kvmesh.router.protocol import ChatCompletionRequest, CompletionRequest
from kvmesh.router.replica_client import (
    ReplicaStream,
    ReplicaTransport,
    open_stream,
    stream_options,
)
from kvmesh.router.response_cache import Generation, ResponseCache, cache_key
from kvmesh.router.routing import metrics as router_metrics
from kvmesh.router.streams import CachedStream, GenerationBuilder, TokenSource, merge
from kvmesh.router.tokenization import ModelInfo, PromptInput, load_model_info

log = logging.getLogger(__name__)

DEBUG_CRASH_HEADER = "x-kvmesh-debug-crash-after"
DEBUG_FAULT_HEADER = "x-kvmesh-debug-fault"
HUB_TIMEOUT_S = 5.0


class IngressConfig(BaseModel):
    """What the ingress needs to know; ``cluster/app_config.py`` derives it from the app config."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: dict[str, dict[str, Any]] = Field(min_length=1)
    """Served name -> engine arguments (for the tokenizer, context length and block size)."""
    aliases: dict[str, dict[str, float]] = Field(default_factory=dict)
    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: str | None = None
    response_cache_entries: int = Field(default=0, ge=0)
    """0 turns the response cache off."""
    response_cache_bytes: int = Field(default=64 << 20, ge=1)
    max_pending_requests: dict[str, int | None] = Field(default_factory=dict)
    """Each model's per-replica engine queue (a cap on prompts per request)."""
    limits: RequestLimits = Field(default_factory=RequestLimits)
    replica_retries: int = Field(default=4, ge=0)
    replica_transport: ReplicaTransport = "grpc"
    debug_hooks: bool = False
    app_name: str = ""
    """The Serve app (autoscaler reports are kept per app and model)."""


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
        # Each model's handle, set up once for streamed calls over the configured transport.
        options = stream_options(self.config.replica_transport)
        self.handles = {name: handle.options(**options) for name, handle in models.items()}
        self.hub = stats_hub
        self.auth = APIKeyAuth(
            [*self.config.api_keys, *keys_from_env(), *keys_from_file(self.config.api_keys_file)]
        )
        n = self.config.response_cache_entries
        self.cache = ResponseCache(n, self.config.response_cache_bytes) if n else None
        self.limits = self.config.limits
        self.metrics = IngressMetrics()
        self.started = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # ---- request handling -----------------------------------------------------------------
    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        self.auth.check(request.headers.get("authorization"))
        limits.session_id(request.headers.get("x-session-id"))  # before any work
        try:
            raw = await read_body(
                request.stream(),
                request.headers.get("content-length"),
                self.limits.max_request_bytes,
            )
        except ClientDisconnect:
            raise APIError(400, "the client disconnected", code="client_disconnected") from None
        try:
            return schema.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def prepare(
        self, encode: Callable[[], list[tuple[str | None, list[int]]]], info: ModelInfo
    ) -> list[PromptInput]:
        """Tokenise (chat template, too) and hash the prompts in a worker thread: a long
        prompt costs milliseconds to seconds of CPU, which must not stall the event loop
        that streams every other request's tokens."""

        def work() -> list[PromptInput]:
            encoded = encode()
            check_prompt_tokens(self.limits, sum(len(ids) for _, ids in encoded))
            return [info.prompt_input(text, ids) for text, ids in encoded]

        return await asyncio.to_thread(work)

    def prompt_cap(self, model: str) -> int | None:
        """A request's prompts run at once on one replica, so no more of them than its engine
        admits (``max_pending_requests``): beyond that a 429 could never clear on retry."""
        return self.config.max_pending_requests.get(model)

    @staticmethod
    def sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        try:
            return req.sampling_params()
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None

    @staticmethod
    async def check_structured(
        req: CompletionRequest | ChatCompletionRequest, info: ModelInfo
    ) -> None:
        """Compile the request's grammar (cached) so a bad one is a 400 naming its field,
        before a replica sees it (``sampling`` has refused malformed ones already)."""
        spec = req.structured_spec
        if spec is not None:
            await info.check_structured(spec[1], spec[0])

    def debug_fault(self, request: Request) -> str | None:
        value = request.headers.get(DEBUG_FAULT_HEADER)
        return value if self.config.debug_hooks and value in ("request", "engine") else None

    def debug_crash_after(self, request: Request) -> int | None:
        value = request.headers.get(DEBUG_CRASH_HEADER)
        if not self.config.debug_hooks or value is None or not value.isdigit():
            return None
        return int(value)

    async def open_sources(
        self,
        request: Request,
        target: str,
        prompts: list[PromptInput],
        params: SamplingParams,
        rid: str,
        arrival: float,
        cacheable: bool,
    ) -> list[TokenSource]:
        """One token source per prompt (a cache hit or an admitted replica stream)."""
        info = self.infos[target]
        crash_after = self.debug_crash_after(request)
        fault = self.debug_fault(request)
        session_id = limits.session_id(request.headers.get("x-session-id"))
        cacheable = cacheable and self.cache is not None and crash_after is None and not fault

        async def open_one(i: int, prompt: PromptInput) -> TokenSource:
            if cacheable:
                key = cache_key(target, prompt.token_ids, params)
                hit = self.cache.get(key)  # type: ignore[union-attr]
                self.metrics.response_cache.labels(target, "hit" if hit else "miss").inc()
                if hit is not None:
                    return CachedStream(hit)
            req = ReplicaRequest(
                request_id=f"{rid}-{i}",
                model=target,
                prompt_token_ids=prompt.token_ids,
                params=params,
                block_hashes=prompt.block_hashes,
                block_size=info.block_size,
                prompt=prompt.text,
                arrival_time=arrival,
                session_id=session_id,
                debug_crash_after=crash_after,
                debug_fault=fault,  # type: ignore[arg-type]
            )
            t_call = time.time()
            stream = await open_stream(
                self.handles[target],
                req,
                retries=self.config.replica_retries,
                retry_after_s=self.limits.retry_after_s,
            )
            self.observe_admission(target, arrival, t_call, stream.admitted)
            return stream

        # One prompt at a time until admitted, then they all generate together. Serve gives
        # every handle call made while serving one HTTP request the same internal request id,
        # and a RequestRouter without FIFO fulfilment matches routed replicas to waiting calls
        # by that id: two calls waiting at once would leave one waiting forever.
        sources: list[TokenSource] = []
        try:
            for i, prompt in enumerate(prompts):
                sources.append(await open_one(i, prompt))
        except BaseException:
            for source in sources:
                source.cancel()
            raise
        return sources

    def remember(self, target: str, prompts, params: SamplingParams, sources, gens) -> None:
        if self.cache is None:
            return
        for prompt, source, gen in zip(prompts, sources, gens, strict=True):
            if isinstance(source, ReplicaStream):
                self.cache.put(cache_key(target, prompt.token_ids, params), gen)

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
        builders = [GenerationBuilder(s.replica) for s in sources]
        try:
            async for i, chunk in merge(sources):
                builders[i].add(chunk)
        finally:
            for source in sources:
                source.cancel()
        return [b.build() for b in builders]

    # ---- /v1/completions ------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.time()
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        target = self.table.resolve(req.model)
        info = self.infos[target]
        params = self.sampling(req)
        await self.check_structured(req, info)
        raw_prompts = req.prompts()
        limits.check_prompt_count(self.limits, len(raw_prompts), self.prompt_cap(target))
        prompts = await self.prepare(lambda: [info.encode(p) for p in raw_prompts], info)
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
        builders = [GenerationBuilder(s.replica) for s in sources]

        async def events() -> AsyncIterator[bytes]:
            async for i, chunk in merge(sources):
                offset = builders[i].text_length
                builders[i].add(chunk)
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
            gens = [b.build() for b in builders]
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
            yield fmt.sse(internal_error(f"stream {rid} failed", exc).body())
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
        await self.check_structured(req, info)
        conversation, tools = req.conversation(), req.tool_dicts()
        prompts = await self.prepare(lambda: [info.encode_chat(conversation, tools)], info)
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
        body = fmt.chat_body(rid, created, target, gens[0], top, info.token_text)
        choice = body["choices"][0]
        choice["message"], called = tool_output.chat_message(
            gens[0].text, req.tool_mode, info.tool_parser
        )
        choice["finish_reason"] = tool_output.finish_reason(choice["finish_reason"], called)
        return JSONResponse(body, headers=headers)

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
        builder = GenerationBuilder(sources[0].replica)
        top = params.logprobs
        tools = None
        if req.tool_mode != "none":
            tools = tool_output.ToolDeltaStream(req.tool_mode, info.tool_parser)

        def chunk_bytes(delta: dict[str, Any], lp: dict | None, reason: str | None) -> bytes:
            return fmt.sse(fmt.chat_chunk(rid, created, target, delta, lp, reason))

        async def events() -> AsyncIterator[bytes]:
            yield chunk_bytes({"role": "assistant", "content": ""}, None, None)
            async for _, chunk in merge(sources):
                builder.add(chunk)
                lp = None
                if top is not None and chunk.delta_logprobs:
                    lp = fmt.chat_logprobs(
                        chunk.delta_token_ids, chunk.delta_logprobs, top, info.token_text
                    )
                if tools is not None:
                    # Tool deltas (and held-back content); logprobs go with plain text only.
                    deltas = tools.feed(chunk.delta_text)
                    if chunk.finish_reason is not None:
                        deltas += tools.finish()
                    for delta in deltas:
                        yield chunk_bytes(delta, None, None)
                    if deltas:
                        self.observe_emit(target, chunk)
                elif chunk.delta_text or lp:
                    data = chunk_bytes({"content": chunk.delta_text}, lp, None)
                    self.observe_emit(target, chunk)
                    yield data
                if chunk.finish_reason is not None:
                    called = tools is not None and tools.num_calls > 0
                    reason = tool_output.finish_reason(chunk.finish_reason, called)
                    yield chunk_bytes({}, None, reason)
            gen = builder.build()
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
        """Every replica's latest stats from the stats hub; 503 while the hub is down (Serve
        restarts it, and replicas push cumulative values, so nothing is lost)."""
        if self.hub is None:
            return []
        try:
            return await asyncio.wait_for(self.hub.snapshot.remote(), HUB_TIMEOUT_S)
        except Exception as exc:
            log.warning("stats hub unavailable: %r", exc)
            raise APIError(
                503,
                "replica statistics are unavailable right now (the stats hub is restarting)",
                code="stats_unavailable",
                retry_after_s=self.limits.retry_after_s,
            ) from None

    async def ready(self) -> tuple[bool, dict[str, int]]:
        """Ready when every model has a replica whose engine can serve."""
        counts = dict.fromkeys(self.config.models, 0)
        for snap in await self.replica_snapshot():
            if snap["model"] in counts and snap["stats"].get("healthy", True):
                counts[snap["model"]] += 1
        return all(counts.values()), counts

    async def autoscaler_reports(self) -> list[dict[str, Any]]:
        """Each autoscaled model's latest autoscaler decision (empty outside a Ray cluster)."""
        if not self.config.app_name:
            return []
        try:
            return await asyncio.to_thread(
                autoscaler_reports.read, self.config.app_name, list(self.config.models)
            )
        except Exception as exc:  # the GCS is briefly unreachable: metrics without them
            log.warning("autoscaler reports unavailable: %r", exc)
            return []

    async def metrics_text(self) -> str:
        texts = [self.metrics.render(), router_metrics.render()]
        texts.extend(s["metrics_text"] for s in await self.replica_snapshot())
        texts.append(autoscaler_reports.render(await self.autoscaler_reports()))
        return merge_expositions(texts)


def endpoint(request: Request) -> str:
    """The matched route's template, never the raw path: metric labels from a closed set."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def internal_error(context: str, exc: BaseException) -> APIError:
    """A 500 whose body says nothing of the internals; the log has them, under the same id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", context, error_id, exc_info=exc)
    return APIError(500, f"internal error (error id {error_id})", code="internal_error")


def build_api(ing: Ingress) -> FastAPI:
    app = FastAPI(title="kvmesh", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(request: Request, err: APIError) -> JSONResponse:
        ing.metrics.requests.labels(endpoint(request), str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            request, internal_error(f"unhandled error in {endpoint(request)}", exc)
        )

    def ok(request: Request, response: Response) -> Response:
        ing.metrics.requests.labels(endpoint(request), str(response.status_code)).inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return ok(request, await ing.completions(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return ok(request, await ing.chat(request))

    # What routers in front of kvmesh ask each worker (vLLM's and SGLang's endpoints).
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return ok(request, JSONResponse(await tokenize_api.tokenize(ing, request)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return ok(request, JSONResponse(await tokenize_api.detokenize(ing, request)))

    @app.get("/get_load")
    async def get_load(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        return ok(request, JSONResponse(await tokenize_api.load(ing)))

    @app.get("/openapi.json")
    async def openapi(request: Request) -> Response:
        from kvmesh.router.openapi import openapi_schema

        return ok(request, JSONResponse(openapi_schema()))

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
                retry_after_s=ing.limits.retry_after_s,
            )
        return ok(request, JSONResponse({"status": "ready", "replicas": counts}))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        text = await ing.metrics_text()
        return ok(request, PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST))

    @app.get("/debug/autoscaler")
    async def debug_autoscaler(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        return ok(request, JSONResponse(await ing.autoscaler_reports()))

    @app.get("/debug/replicas")
    async def debug_replicas(request: Request) -> Response:
        ing.auth.check(request.headers.get("authorization"))
        snaps = await ing.replica_snapshot()
        body = [{k: v for k, v in s.items() if k != "metrics_text"} for s in snaps]
        return ok(request, JSONResponse(body))

    return app
