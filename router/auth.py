"""Optional API keys: ``Authorization: Bearer <key>``, from ``KVMESH_API_KEYS``, a key file
(``api_keys_file``, one key per line) or, for a local ``kvmesh serve``, the config itself.

With no keys configured the API is open (a laptop default). Keys shorter than
``MIN_API_KEY_CHARS`` are refused when the app starts: a short key is guessable, an empty one
would match an empty ``Bearer`` header. Keys are compared with
``hmac.compare_digest`` against every configured key, without stopping at the first match, so
response timing says nothing about how much of a guess was right or which key it resembled.
"""

from __future__ import annotations

import hmac
import os

from kvmesh.router.errors import APIError

ENV_VAR = "KVMESH_API_KEYS"
MIN_API_KEY_CHARS = 16


def check_api_key(key: str, source: str) -> str:
    """``key`` if it is long enough; the error names where it came from, never the key."""
    if len(key) < MIN_API_KEY_CHARS or key != key.strip():
        raise ValueError(
            f"{source}: API keys must be at least {MIN_API_KEY_CHARS} characters without "
            f"surrounding spaces (got one of {len(key)})"
        )
    return key


def keys_from_env() -> list[str]:
    raw = [k.strip() for k in os.environ.get(ENV_VAR, "").split(",")]
    return [check_api_key(k, ENV_VAR) for k in raw if k]


def keys_from_file(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise ValueError(f"api_keys_file: cannot read {path}: {exc.strerror}") from None
    return [check_api_key(k, f"api_keys_file {path}") for k in lines if k]


class APIKeyAuth:
    def __init__(self, keys: list[str]) -> None:
        for key in keys:
            check_api_key(key, "api_keys")
        self._keys = [k.encode() for k in dict.fromkeys(keys)]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        if not authorization:
            raise APIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise APIError(401, "incorrect API key", code="invalid_api_key")
