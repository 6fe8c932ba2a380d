"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Handlers raise ``APIError``; the ingress turns it into a JSON response (or, once a stream has
started, into an SSE error event). Clients built for OpenAI read ``type`` and ``code``;
``Retry-After`` tells a client when an overloaded server is worth retrying.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.extra_headers = dict(headers or {})

    @property
    def type(self) -> str:
        return _TYPES.get(
            self.status, "internal_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers)  # e.g. a 405's Allow
        if self.retry_after_s is not None:
            out["Retry-After"] = str(self.retry_after_s)
        return out


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "TextPart", "StreamOptions"}


def _loc(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``; pydantic's union tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS):
            continue  # a union member's name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError) -> APIError:
    """The most specific problem, named by its field, as a 400.

    A union field (``prompt``, ``stop``, ``content``) fails once per alternative; a value error
    deep inside one alternative says more than "not a string" from the first.
    """
    errors = exc.errors(include_url=False)
    specific = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or errors
    first = max(specific, key=lambda e: len(e.get("loc", ())))
    param = _loc(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        head = msg.split(":", 1)[0]
        if not param and head.isidentifier():
            param = head
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    text = f"{param}: {msg}" if param and not msg.startswith(param) else msg
    return APIError(400, text, param=param or None, code="invalid_value")
