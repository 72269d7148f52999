"""HTTP plumbing every handler shares: request bodies in, JSON and ``{"error"}`` bodies out, and
the one mapping of exceptions to error responses (``HANDLERS``, used by starlette and by the
inference path alike)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import (
    BadRequest,
    Conflict,
    GatewayError,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
    cut,
)
from gateway.http import codec
from gateway.http.fields import integer
from gateway.http.refusals import REFUSALS
from router.policy.policies import ActionConflict, PolicyError
from router.state.outbox import OutboxUnavailable
from router.state.store import StaleRevision, StoreUnavailable
from router.state.table import RewardConflict, UnknownInference

log = logging.getLogger("turnout")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_MAX_CONTENT_LENGTH = 1 << 62  # beyond any body cap: compared with the cap next
ROUTER_MESSAGE_CHARS = 1000
# JSON bodies from this size are parsed on a worker thread (read_json_object)
OFFLOADED_JSON = 1 << 20


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def read_body(
    receive: Receive,
    headers: Mapping[str, str] | None,
    limit: int,
    declared: str | bytes | None = None,
) -> bytes:
    """The whole body from ASGI ``receive``, refused with 413 as soon as it is known to exceed
    ``limit``: from the Content-Length in ``headers`` (or ``declared``, when the caller read
    it already and passes None for ``headers``), else as the body arrives. Raises starlette's
    ClientDisconnect when the client leaves before the end."""
    if headers is not None:
        declared = headers.get("content-length")
    check_declared_length(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_declared_length(declared: str | bytes | None, limit: int) -> None:
    """413 for a body whose Content-Length exceeds ``limit``; 400 for one that is no length.
    ``declared`` may be the header's raw bytes (the request path's: no decode)."""
    if declared is not None:
        if type(declared) is bytes and declared.isdigit() and len(declared) < 19:
            size = int(declared)  # bytes.isdigit is ASCII only; the usual header, at 0.1 µs
        else:
            text = declared.decode("latin-1") if isinstance(declared, bytes) else declared
            size = integer("Content-Length", text, _MAX_CONTENT_LENGTH)
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")


async def read_json_object(request: Request, limit: int = 1 << 20) -> dict[str, Any]:
    """A JSON object body (admin, feedback and outcomes calls); an empty body is ``{}``. A body
    of a MiB or more is parsed off the event loop."""
    body = await read_body(request.receive, request.headers, limit)
    if not body.strip():
        return {}
    try:
        if len(body) >= OFFLOADED_JSON:
            value = await asyncio.to_thread(orjson.loads, body)
        else:
            value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        codec.encode_error(message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, RateLimited):
            headers.update(exc.headers)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, UnsupportedMediaType):
        headers["Accept-Encoding"] = exc.accept_encoding
    path = cut(request.url.path)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
    elif isinstance(exc, Unauthorized):
        # The reason only: never the header, which may hold a real token sent to the wrong place.
        client = request.client.host if request.client else "-"
        REFUSALS.refused(
            exc.reason, f"refused {request.method} {path} from {client}: {exc.message}"
        )
    else:
        log.debug("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
    return error_response(exc.status, exc.message, headers)


def _stale(exc: Exception) -> GatewayError:
    assert isinstance(exc, StaleRevision)
    return PreconditionFailed(
        f"the policy of {exc.model!r} is at revision {exc.current}, not {exc.expected}; "
        "read it again and retry"
    )


# The router's errors as the gateway's (the router stands below the gateway and cannot raise
# these itself). Most specific first, as in HANDLERS. Their messages may quote a client's values
# (a document's unknown field names, an inference id) and the router cannot cut them: cut here.
ROUTER_ERRORS: dict[type[Exception], Callable[[Exception], GatewayError]] = {
    ActionConflict: lambda exc: Conflict(cut(str(exc), ROUTER_MESSAGE_CHARS)),
    RewardConflict: lambda exc: Conflict(cut(str(exc), ROUTER_MESSAGE_CHARS)),
    PolicyError: lambda exc: BadRequest(cut(str(exc), ROUTER_MESSAGE_CHARS)),
    UnknownInference: lambda exc: NotFound(cut(str(exc), ROUTER_MESSAGE_CHARS)),
    StaleRevision: _stale,
    StoreUnavailable: lambda exc: NotReady(f"routing state store unavailable: {exc}"),
    OutboxUnavailable: lambda exc: NotReady(f"event outbox unavailable: {exc}"),
}


async def router_error(request: Request, exc: Exception) -> Response:
    kind = next(k for k in type(exc).__mro__ if k in ROUTER_ERRORS)
    return await gateway_error(request, ROUTER_ERRORS[kind](exc))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # starlette's bare "Not Found" says nothing useful
        message = f"{message}: no route for {request.method} {cut(request.url.path)}"
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def too_deep(request: Request, exc: Exception) -> Response:
    """A client's JSON nested hundreds of levels (orjson accepts 1024) met code that recurses
    over it, such as a repr in a validation message: the client's mistake, not a fault."""
    log.warning("%s %s -> 400: nested too deeply (%s)", request.method, cut(request.url.path), exc)
    return error_response(400, "request JSON is nested too deeply to process")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, cut(request.url.path), exc_info=exc)
    return error_response(500, "internal server error")


Handler = Callable[[Request, Exception], Awaitable[Response]]
# Most specific first: ``handler_for`` takes the first match, as starlette does by the MRO.
HANDLERS: dict[type[Exception], Handler] = {
    GatewayError: gateway_error,
    **dict.fromkeys(ROUTER_ERRORS, router_error),
    HTTPException: http_error,
    RecursionError: too_deep,
    Exception: unexpected_error,
}


def handler_for(exc: Exception) -> Handler:
    for kind in type(exc).__mro__:
        handler = HANDLERS.get(kind)
        if handler is not None:
            return handler
    return unexpected_error
