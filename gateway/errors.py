"""The gateway's exception tree. Each error carries its HTTP status; one table
(``gateway.http.responses.HANDLERS``) maps it, and the router's errors, to the protocol's error
body ``{"error": message}``. Nothing here imports starlette.

    GatewayError (500)
    ├── BadRequest (400)          malformed input, shapes, datatypes, limits
    ├── Unauthorized (401)        missing or wrong credentials
    ├── Forbidden (403)
    ├── NotFound (404)            model, version, route, action
    ├── Conflict (409)
    ├── PreconditionFailed (412)
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415) a Content-Encoding the gateway cannot decode; Accept-Encoding
    ├── Overloaded (429)          queue full; carries Retry-After
    │   └── RateLimited (429)     over the client's rate limit or quota; RateLimit headers
    ├── ClientGone (499)          the client left while its request waited; nothing is sent
    ├── ModelError (500)          the model failed on a well-formed request
    ├── LoadError (500)           a version could not load; the registry shows it as the reason
    ├── NotReady (503)            model not loaded yet, store unavailable
    └── Timeout (504)

The router cannot import this module (it stands below the gateway); its errors are mapped in the
same table: PolicyError -> 400, ActionConflict -> 409, UnknownInference -> 404,
StaleRevision -> 412, StoreUnavailable -> 503.
"""

from __future__ import annotations

from typing import Literal, get_args

# Why a credential was refused: the label set of turnout_refused_total, fixed by the code.
RefusalReason = Literal["missing", "malformed", "invalid", "expired", "disabled"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)
SHOWN_CHARS = 200  # of a client's value in a message or a log line


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` (a client's value, or a message quoting one) as a message or log line shows it:
    the first ``limit`` characters, then a marker saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


class GatewayError(Exception):
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401

    def __init__(self, message: str, reason: RefusalReason) -> None:
        super().__init__(message)
        self.reason = reason


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class PreconditionFailed(GatewayError):
    status = 412


class PayloadTooLarge(GatewayError):
    status = 413


class UnsupportedMediaType(GatewayError):
    """The body's Content-Encoding is not one the gateway decodes; ``accept_encoding`` lists
    those it does (sent as the response's Accept-Encoding, RFC 9110 §15.5.16)."""

    status = 415

    def __init__(self, message: str, accept_encoding: str) -> None:
        super().__init__(message)
        self.accept_encoding = accept_encoding


class Overloaded(GatewayError):
    status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientGone(GatewayError):
    """The client closed the connection while its request waited (nginx's 499): no answer is
    sent, and the request is counted as the client's doing, not the gateway's."""

    status = 499


class RateLimited(Overloaded):
    """Over the principal's limits (gateway.http.limits); ``headers`` are the IETF RateLimit
    fields, ``retry_after_s`` a whole number of seconds."""

    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after_s)
        self.headers = headers


class ModelError(GatewayError):
    """The model itself failed on a well-formed request (an onnxruntime error)."""

    status = 500


class LoadError(GatewayError):
    """A version could not be loaded; the message is the reason shown in the repository index."""


class NotReady(GatewayError):
    status = 503


class Timeout(GatewayError):
    status = 504
