"""The app's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies come straight from the pydantic models in ``router.protocol`` (their ``$defs``
hoisted into ``components.schemas``), so the document cannot drift from what the ingress
validates; ``_add_validator_rules`` adds the few rules the models check in code. Response
bodies are written out here: ``router.openai_format`` builds them as plain dicts, and these
schemas say what those dicts hold. Streams are Server-Sent Events; each event's ``data`` is a
JSON chunk, an error, or the final ``[DONE]`` (``contentMediaType`` / ``contentSchema``
describe the JSON inside the event).

``tests/serving/test_api_fuzz.py`` fuzzes the live app against this document (schemathesis):
a response that does not match it fails CI, so keep both in step.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic import BaseModel

from kvmesh.router.errors import _TYPES as ERROR_TYPES
from kvmesh.router.limits import MAX_SESSION_ID_CHARS
from kvmesh.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

JSON = "application/json"
SSE = "text/event-stream"
PROMETHEUS = "text/plain"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], *, optional: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An object whose properties are all required except ``optional`` ones."""
    required = [k for k in properties if k not in optional]
    return {"type": "object", "properties": properties, "required": required, **extra}


COUNT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
NUM = {"type": "number"}
# A logprob is <= 0 (and finite: -inf is not JSON); null where the engine reported none.
LOGPROB = {"type": "number", "maximum": 0}
FINISH_REASON = {"enum": ["stop", "length"]}
CHAT_FINISH_REASON = {"enum": ["stop", "length", "tool_calls"]}


# ---- response bodies ----------------------------------------------------------------------
def _response_schemas() -> dict[str, Schema]:
    usage = obj(
        {
            "prompt_tokens": COUNT,
            "completion_tokens": COUNT,
            "total_tokens": COUNT,
            "prompt_tokens_details": obj({"cached_tokens": COUNT}),
        }
    )
    completion_logprobs = obj(
        {
            "tokens": {"type": "array", "items": STR},
            "token_logprobs": {"type": "array", "items": nullable(LOGPROB)},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": LOGPROB},
            },
            "text_offset": {"type": "array", "items": COUNT},
        }
    )
    token_logprob = obj(
        {
            "token": STR,
            "logprob": nullable(LOGPROB),
            "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
        }
    )
    chat_token_logprob = {
        "allOf": [
            token_logprob,
            obj({"top_logprobs": {"type": "array", "items": ref("ChatTokenLogprob")}}),
        ]
    }
    chat_logprobs = obj({"content": {"type": "array", "items": ref("ChatTokenLogprobEntry")}})

    def completion_like(obj_name: str, choices: Schema, *, with_usage: bool) -> Schema:
        props = {
            "id": STR,
            "object": {"const": obj_name},
            "created": COUNT,
            "model": STR,
            "choices": choices,
        }
        if with_usage:
            props["usage"] = ref("Usage")
        return obj(props)

    completion_choice = obj(
        {
            "index": COUNT,
            "text": STR,
            "logprobs": nullable(ref("CompletionLogprobs")),
            "finish_reason": FINISH_REASON,
        }
    )
    function_call = obj({"name": STR, "arguments": STR})
    tool_call = obj({"id": STR, "type": {"const": "function"}, "function": function_call})
    chat_choice = obj(
        {
            "index": {"const": 0},
            "message": obj(
                {
                    "role": {"const": "assistant"},
                    "content": nullable(STR),
                    "tool_calls": {"type": "array", "items": tool_call, "minItems": 1},
                },
                optional=("tool_calls",),
            ),
            "logprobs": nullable(ref("ChatLogprobs")),
            "finish_reason": CHAT_FINISH_REASON,
        }
    )
    # A streamed call: its first delta has id, type and name; later ones argument pieces.
    tool_call_delta = obj(
        {
            "index": COUNT,
            "id": STR,
            "type": {"const": "function"},
            "function": obj({"name": STR, "arguments": STR}, optional=("name", "arguments")),
        },
        optional=("id", "type"),
    )
    # Stream chunks: the finish reason is null until a choice's last chunk.
    completion_chunk_choice = obj(
        {
            "index": COUNT,
            "text": STR,
            "logprobs": nullable(ref("CompletionLogprobs")),
            "finish_reason": nullable(FINISH_REASON),
        }
    )
    chat_chunk_choice = obj(
        {
            "index": {"const": 0},
            "delta": obj(
                {
                    "role": {"const": "assistant"},
                    "content": STR,
                    "tool_calls": {"type": "array", "items": tool_call_delta, "minItems": 1},
                },
                optional=("role", "content", "tool_calls"),
            ),
            "logprobs": nullable(ref("ChatLogprobs")),
            "finish_reason": nullable(CHAT_FINISH_REASON),
        }
    )

    def choices(choice: Schema) -> Schema:
        return {"type": "array", "items": choice, "minItems": 1}

    # The extra last chunk of ``stream_options.include_usage``: no choices, the usage.
    no_choices = {"type": "array", "maxItems": 0}

    model_entry = obj(
        {
            "id": STR,
            "object": {"const": "model"},
            "created": COUNT,
            "owned_by": STR,
            "max_model_len": {"type": "integer", "minimum": 1},
            "versions": {"type": "object", "additionalProperties": NUM},
        },
        optional=("max_model_len", "versions"),
        description="A served model (with max_model_len) or an alias (with versions: weights).",
    )
    engine_stats = obj(
        {
            "replica": STR,
            "model": STR,
            "healthy": {"type": "boolean"},
            "num_in_flight": COUNT,
            "kv_blocks_total": COUNT,
            "kv_blocks_free": COUNT,
            "kv_cache_usage": {"type": "number", "minimum": 0, "maximum": 1},
            "num_requests_running": COUNT,
            "num_requests_waiting": COUNT,
        },
        optional=("replica", "model", "healthy", "num_in_flight"),
        description="The replica's engine counters (more keys than listed may appear).",
    )
    replica = obj(
        {"model": STR, "replica": STR, "stats": ref("EngineStats"), "age_s": {**NUM, "minimum": 0}}
    )
    error = obj(
        {
            "error": obj(
                {
                    "message": STR,
                    "type": {"enum": sorted(set(ERROR_TYPES.values()))},
                    "param": nullable(STR),
                    "code": nullable(STR),
                },
                additionalProperties=False,
            )
        },
        additionalProperties=False,
    )
    token_id = {"type": "integer", "minimum": 0}
    tokenized = obj(
        {
            "count": COUNT,
            "max_model_len": {"type": "integer", "minimum": 1},
            "tokens": {"type": "array", "items": token_id},
            "token_strs": nullable({"type": "array", "items": STR}),
        },
        description="The token ids a replica is given for that prompt or conversation; "
        "`token_strs` only with `return_token_strs`.",
    )
    load_entry = obj(
        {
            "dp_rank": COUNT,
            "num_reqs": COUNT,
            "num_waiting_reqs": COUNT,
            "num_tokens": COUNT,
            "model": STR,
            "replica": STR,
        },
        description="One replica's load, in SGLang's shape: requests running or queued, "
        "of which queued; `num_tokens`: KV-cache tokens held by requests plus prompt tokens "
        "queued for prefill.",
    )
    return {
        "TokenizeResponse": tokenized,
        "DetokenizeResponse": obj({"prompt": STR}),
        "ReplicaLoad": load_entry,
        "Usage": usage,
        "CompletionLogprobs": completion_logprobs,
        "ChatTokenLogprob": token_logprob,
        "ChatTokenLogprobEntry": chat_token_logprob,
        "ChatLogprobs": chat_logprobs,
        "Completion": completion_like(
            "text_completion", choices(completion_choice), with_usage=True
        ),
        "ChatCompletion": completion_like("chat.completion", choices(chat_choice), with_usage=True),
        "CompletionChunk": completion_like(
            "text_completion", choices(completion_chunk_choice), with_usage=False
        ),
        "ChatCompletionChunk": completion_like(
            "chat.completion.chunk", choices(chat_chunk_choice), with_usage=False
        ),
        "CompletionUsageChunk": completion_like("text_completion", no_choices, with_usage=True),
        "ChatCompletionUsageChunk": completion_like(
            "chat.completion.chunk", no_choices, with_usage=True
        ),
        "ModelList": obj(
            {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}
        ),
        "Model": model_entry,
        "EngineStats": engine_stats,
        "Replica": replica,
        "Error": error,
    }


def _sse(*chunks: str) -> Schema:
    """One Server-Sent Event of a stream: ``data`` is ``[DONE]`` or JSON (a chunk or an error:
    a failure after the stream started is reported in-band, then ``[DONE]``)."""
    payload = {"anyOf": [ref(c) for c in chunks] + [ref("Error")]}
    return obj(
        {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": JSON, "contentSchema": payload},
            }
        },
        description="A Server-Sent Event: `data: <JSON chunk>` ... then `data: [DONE]`.",
    )


# ---- responses ------------------------------------------------------------------------------
_ERROR_WHEN = {
    400: "Malformed JSON, an unknown or invalid field, token ids outside the vocabulary, more "
    "prompts than `limits.max_prompts_per_request`, an `x-session-id` over 256 characters.",
    401: "API keys are configured and the `Authorization: Bearer` key is missing or wrong.",
    404: "Unknown `model`.",
    413: "The prompt does not fit the model's context, or the request is over "
    "`limits.max_request_bytes` or `limits.max_prompt_tokens_per_request`.",
    429: "A replica's engine queue is full; retry after `Retry-After` seconds.",
    503: "Too many requests waiting for a replica, or none could take it; see `Retry-After`.",
}
HUB_DOWN = "The stats hub is unavailable (Serve is restarting it); see `Retry-After`."
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


def error_response(status: int, description: str | None = None) -> Schema:
    out: Schema = {
        "description": description or _ERROR_WHEN[status],
        "content": {JSON: {"schema": ref("Error")}},
    }
    if status in (429, 503):
        out["headers"] = RETRY_AFTER
    return out


def json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


GENERATION_HEADERS = {
    name: {"description": text, "required": True, "schema": STR}
    for name, text in {
        "x-kvmesh-replica": "The replica(s) that served the request.",
        "x-kvmesh-model-version": "The served model (an alias resolves to one of its versions).",
        "x-kvmesh-request-id": "The request's id (also the body's `id`).",
    }.items()
}


SESSION_ID = {
    "name": "x-session-id",
    "in": "header",
    "required": False,
    "description": "Lets a session-aware router keep a conversation on one replica.",
    "schema": {"type": "string", "maxLength": MAX_SESSION_ID_CHARS},
}


def generation_operation(summary: str, request: str, body: str, chunks: tuple[str, ...]) -> Schema:
    return {
        "summary": summary,
        "parameters": [SESSION_ID],
        "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
        "responses": {
            "200": {
                "description": "The generation; a stream of chunks when `stream` is true.",
                "headers": GENERATION_HEADERS,
                "content": {JSON: {"schema": ref(body)}, SSE: {"schema": _sse(*chunks)}},
            },
            **{str(s): error_response(s) for s in (400, 401, 404, 413, 429, 503)},
        },
    }


def _request_schemas(*models: type[BaseModel]) -> dict[str, Schema]:
    """Each model's JSON schema, its ``$defs`` hoisted into the shared components."""
    out: dict[str, Schema] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            if out.setdefault(name, sub) != sub:
                raise ValueError(f"two request models define {name!r} differently")
        out[model.__name__] = schema
    _add_validator_rules(out)
    return out


def _add_validator_rules(schemas: dict[str, Schema]) -> None:
    """What the server enforces beyond the request models' field schemas: their
    ``model_validator`` rules and the tokenizer's empty-prompt check. A property that moved
    or changed shape fails here (KeyError / AssertionError), not silently. Rules across two
    fields are only described: schemathesis' coverage phase cannot build examples for more
    than one ``if``/``then`` per schema."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert props["n"]["type"] == "integer"
        props["n"]["maximum"] = 1  # "n: only n=1 is supported"
        top_k = props["top_k"]["anyOf"][0]
        assert top_k["type"] == "integer"
        top_k["not"] = {"const": 0}  # "top_k: must be -1 (disabled) or at least 1"
        props["stream_options"]["description"] = "Only allowed when `stream` is true."
    chat = schemas["ChatCompletionRequest"]["properties"]
    chat["top_logprobs"]["description"] = "Only allowed when `logprobs` is true."
    # A prompt string must hold at least one token: "prompt must not be empty".
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    for text in (prompt[0], prompt[1]["items"]):
        assert text["type"] == "string"
        text["minLength"] = 1


@functools.cache
def _build() -> dict[str, Any]:
    public = {"security": []}  # no API key needed
    paths = {
        "/v1/completions": {
            "post": generation_operation(
                "Text completion (OpenAI legacy completions)",
                "CompletionRequest",
                "Completion",
                ("CompletionChunk", "CompletionUsageChunk"),
            )
            | {"operationId": "createCompletion"}
        },
        "/v1/chat/completions": {
            "post": generation_operation(
                "Chat completion",
                "ChatCompletionRequest",
                "ChatCompletion",
                ("ChatCompletionChunk", "ChatCompletionUsageChunk"),
            )
            | {"operationId": "createChatCompletion"}
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "Served models and aliases",
                "responses": {
                    "200": json_response("The models.", ref("ModelList")),
                    "401": error_response(401),
                },
            }
        },
        "/tokenize": {
            "post": {
                "operationId": "tokenize",
                "summary": "A prompt's or a conversation's token ids (vLLM's /tokenize)",
                "description": "The ids the generation endpoints give a replica: `prompt` as "
                "`/v1/completions` tokenises it, `messages` (and `tools`) through the chat "
                "template as `/v1/chat/completions` does. Prompts longer than the context are "
                "counted, not refused.",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": ref("TokenizeRequest")}},
                },
                "responses": {
                    "200": json_response("The token ids.", ref("TokenizeResponse")),
                    **{str(s): error_response(s) for s in (400, 401, 404, 413)},
                },
            }
        },
        "/detokenize": {
            "post": {
                "operationId": "detokenize",
                "summary": "Token ids back to text (vLLM's /detokenize)",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": ref("DetokenizeRequest")}},
                },
                "responses": {
                    "200": json_response("The text.", ref("DetokenizeResponse")),
                    **{str(s): error_response(s) for s in (400, 401, 404, 413)},
                },
            }
        },
        "/get_load": {
            "get": {
                "operationId": "getLoad",
                "summary": "Each replica's load (SGLang's /get_load, for sglang-router)",
                "responses": {
                    "200": json_response(
                        "One entry per live replica.",
                        {"type": "array", "items": ref("ReplicaLoad")},
                    ),
                    "401": error_response(401),
                    "503": error_response(503, HUB_DOWN),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "The ingress is up",
                **public,
                "responses": {
                    "200": json_response("Up.", obj({"status": {"const": "ok"}})),
                },
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "summary": "Every model has a loaded replica",
                **public,
                "responses": {
                    "200": json_response(
                        "Ready: live replicas per model.",
                        obj(
                            {
                                "status": {"const": "ready"},
                                "replicas": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer", "minimum": 1},
                                },
                            }
                        ),
                    ),
                    "503": error_response(
                        503, "Some model has no healthy replica yet, or the stats hub is down."
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: the ingress and every replica, merged",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "content": {PROMETHEUS: {"schema": STR}},
                    },
                    "401": error_response(401),
                    "503": error_response(503, HUB_DOWN),
                },
            }
        },
        "/debug/replicas": {
            "get": {
                "operationId": "debugReplicas",
                "summary": "Each replica's live engine stats",
                "responses": {
                    "200": json_response(
                        "One entry per live replica.", {"type": "array", "items": ref("Replica")}
                    ),
                    "401": error_response(401),
                    "503": error_response(503, HUB_DOWN),
                },
            }
        },
        "/debug/autoscaler": {
            "get": {
                "operationId": "debugAutoscaler",
                "summary": "Each autoscaled model's latest autoscaler decision",
                "responses": {
                    "200": json_response(
                        "One entry per autoscaled model.",
                        {"type": "array", "items": {"type": "object"}},
                    ),
                    "401": error_response(401),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvmesh",
            "version": "0.1.0",
            "description": "An OpenAI-compatible LLM serving API (see README: The API).",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **_request_schemas(
                    CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest
                ),
                **_response_schemas(),
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed when API keys are configured; any key otherwise.",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def openapi_schema() -> dict[str, Any]:
    """The document (built once; each caller gets its own copy to change as it likes)."""
    return copy.deepcopy(_build())
