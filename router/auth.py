"""Optional API keys: ``Authorization: Bearer <key>``, from the config and ``KVMESH_API_KEYS``.

With no keys configured the API is open (a laptop default). Keys are compared with
``hmac.compare_digest`` against every configured key, without stopping at the first match, so
response timing says nothing about how much of a guess was right or which key it resembled.
"""

from __future__ import annotations

import hmac
import os

from kvmesh.router.errors import APIError

ENV_VAR = "KVMESH_API_KEYS"


def keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]


class APIKeyAuth:
    def __init__(self, keys: list[str]) -> None:
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
