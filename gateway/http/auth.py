"""Bearer tokens with names and optional expiry. Tokens are compared in constant time and never
logged; an error never says which token was tried or matched."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Protocol

from gateway.errors import Unauthorized

API_KEY_HEADER = "x-api-key"


class TokenAuth:
    def __init__(
        self,
        tokens: Mapping[str, str],
        expiry: Mapping[str, datetime] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        disabled: str = "admin API disabled: no admin tokens are configured",
        what: str = "bearer token",
    ) -> None:
        until = {name: when.timestamp() for name, when in (expiry or {}).items()}
        self._tokens = [
            (name, token.encode(), until.get(name, float("inf"))) for name, token in tokens.items()
        ]
        self._clock = clock
        self._disabled = disabled
        self._what = what

    def authenticate(self, authorization: str | None) -> str:
        """Return the name of the token presented in an ``Authorization: Bearer`` header."""
        if not self._tokens:
            raise Unauthorized(self._disabled, "disabled")
        if authorization is None:
            raise Unauthorized(f"missing {self._what}", "missing")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("expected 'Authorization: Bearer <token>'", "malformed")
        return self.verify(presented.strip())

    def verify(self, presented: str) -> str:
        """The name of the token ``presented`` is; Unauthorized when none, or when it expired."""
        candidate = presented.encode("utf-8", "surrogatepass")
        who, until = None, 0.0
        # Compare against every token so the time taken does not say which one matched.
        for name, token, expires in self._tokens:
            if hmac.compare_digest(candidate, token) and who is None:
                who, until = name, expires
        if who is None:
            raise Unauthorized(f"invalid {self._what}", "invalid")
        if self._clock() >= until:
            raise Unauthorized(f"{self._what} expired", "expired")
        return who

    def expired(self) -> list[str]:
        """Names of the tokens that no longer work (for a warning at start-up)."""
        now = self._clock()
        return [name for name, _, expires in self._tokens if now >= expires]


class KeyCheck(Protocol):
    """Guards the inference API: returns the key's name, or raises Unauthorized."""

    def check(self, headers: Mapping[str, str]) -> str | None: ...


class OpenAccess:
    """No API keys configured: every caller is let in."""

    def check(self, headers: Mapping[str, str]) -> str | None:
        return None


class ApiKeys:
    """A key in ``X-API-Key``, else in ``Authorization: Bearer``."""

    def __init__(self, auth: TokenAuth, what: str = "API key") -> None:
        self._auth = auth
        self._what = what

    def check(self, headers: Mapping[str, str]) -> str | None:
        key = headers.get(API_KEY_HEADER)
        if key is not None:
            return self._auth.verify(key.strip())
        if headers.get("authorization") is None:
            raise Unauthorized(
                f"missing {self._what}: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                "missing",
            )
        return self._auth.authenticate(headers.get("authorization"))


def key_check(
    keys: Mapping[str, str],
    expiry: Mapping[str, datetime] | None = None,
    clock: Callable[[], float] = time.time,
    what: str = "API key",
) -> KeyCheck:
    """The inference API's guard (or feedback's, with ``what="feedback key"``): open without
    keys, else keys required."""
    if not keys:
        return OpenAccess()
    return ApiKeys(TokenAuth(keys, expiry, clock=clock, what=what), what)
