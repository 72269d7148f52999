"""The inference request path, as a plain ASGI app:
body -> parse -> route -> decode -> run -> encode -> respond, then shadow and observe.

It is nearly all of a gateway's traffic, and for a light model the framework was most of its
cost: starlette's routing, middleware, ``Request`` and ``Response`` took about 25 of the 95 µs a
request cost in-process. So ``Gateway`` (app.py) hands ``POST .../infer`` straight to
``Inference.serve``, and the starlette routes reach the same code (``__call__``) only for what
the front does not recognise (a ``root_path``, other methods: 405). Errors go through the one
mapping in ``gateway.http.responses``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.background.predictions import Record
from gateway.background.quality import Quality
from gateway.background.shadow import ShadowRunner
from gateway.errors import (
    BadRequest,
    ClientGone,
    NotFound,
    NotReady,
    PayloadTooLarge,
    RateLimited,
    Timeout,
    Unauthorized,
)
from gateway.http import codec, inflate
from gateway.http.auth import KeyCheck
from gateway.http.clients import principal_of
from gateway.http.limits import Limits, Ticket
from gateway.http.responses import Receive, handler_for, read_body
from gateway.serving.registry import Loaded, Registry
from gateway.serving.traffic import CLIENT_CLOSED, UNKNOWN_MODEL, Traffic, judged
from gateway.settings import Settings
from router.state.table import RouteTable

log = logging.getLogger("turnout.inference")

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Observation = tuple[Loaded, dict[str, np.ndarray], dict[str, np.ndarray], float, float]
Observe = Callable[[Loaded, dict[str, np.ndarray], dict[str, np.ndarray], float, float], None]

_PREFIX, _SUFFIX = "/v2/models/", "/infer"
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]
# labels[3] of a request whose own ``timeout`` parameter is below the guards' floor
CLIENT_DEADLINE = "client"
# Bodies of at least this many bytes are large: parsed and decoded on the decode pool, so the
# event loop keeps answering others meanwhile (smaller ones take under a few ms on the loop), and
# at most LARGE_REQUESTS of them are served at once (from parse to response; others wait with
# their bodies read). docs/deploy.md sizes the body cap with it.
OFFLOADED_BODY = 1 << 20
LARGE_REQUESTS = 2
# labels[2] (role) of a request refused by its client's rate limit or quota
LIMITED = "limited"


class RequestHeaders(Headers):
    """starlette's ``Headers`` with a direct ``get``. The inherited one is ``Mapping.get``, which
    calls ``__getitem__`` and, for an absent header (the usual case for most that are asked),
    raises and catches a KeyError. The two a request asks cost 1.5 µs instead of
    2.8 (loadtests/stage_cost.py)."""

    def get(self, key: str, default: Any = None) -> Any:
        wanted = key.lower().encode("latin-1")
        for name, value in self._list:
            if name == wanted:
                return value.decode("latin-1")
        return default


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when ``path`` is an inference path, as starlette's
    ``/v2/models/{model}[/versions/{version}]/infer`` would match it; else None."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def _unobserved(
    loaded: Loaded,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    total_s: float,
    model_s: float,
) -> None:
    """The monitor of a gateway whose monitors are off."""


class Inference:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        table: RouteTable,
        shadows: ShadowRunner,
        traffic: Traffic,
        keys: KeyCheck,
        limits: Limits,
        record: Record | None = None,
        quality: Quality | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.table = table
        self.shadows = shadows
        self.traffic = traffic
        self.keys = keys
        self.limits = limits
        # the prediction log's offer (gateway.background.predictions); None: the log is off
        self.record = record
        self.quality = quality
        # Chosen once: with monitors off the hot path calls a function that does nothing.
        self.observe: Observe = self._observe if settings.monitors else _unobserved
        self.decoder = ThreadPoolExecutor(LARGE_REQUESTS, thread_name_prefix="turnout-decode")
        self.large = asyncio.Semaphore(LARGE_REQUESTS)

    def close(self) -> None:
        self.decoder.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a starlette route endpoint: the path parameters are already matched."""
        params = scope["path_params"]
        await self.serve(scope, receive, send, params["model"], params.get("version"))

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, model: str, pinned: str | None
    ) -> None:
        start = time.perf_counter()
        headers = RequestHeaders(scope=scope)
        try:
            principal = principal_of(self.keys.check(headers), scope)  # before anything is read
        except Unauthorized as exc:
            await (await handler_for(exc)(Request(scope, receive), exc))(scope, receive, send)
            return
        label = model if self.registry.known(model) else UNKNOWN_MODEL
        gate = self.limits.gate  # None: no rate limits in force
        ticket = None if gate is None else gate.ticket(principal, label)
        traffic = self.traffic
        traffic.inflight[label] += 1
        # model, version and role (filled in once routed), and CLIENT_DEADLINE when the client
        # chose a deadline below the guards' floor
        labels = [label, "", "unknown", ""]
        code = "500"
        failure: Response | None = None
        try:
            if ticket is not None:
                await ticket.before_body()
            # The two headers the body needs, in one pass (each ``get`` is a pass of its own).
            length = encoding = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = value
                elif name == b"content-encoding":  # repeated, the codings add up (RFC 9110)
                    text = value.decode("latin-1")
                    encoding = text if encoding is None else f"{encoding}, {text}"
            cap = self.settings.max_body_bytes
            if encoding is None or (coding := inflate.coding_of(encoding)) is None:
                body = await read_body(receive, None, cap, length)
            else:
                body = await inflate.read_inflated(receive, length, coding, cap, self.decoder)
            if len(body) < OFFLOADED_BODY:
                content, json_length, observed = await self._infer(
                    headers, body, receive, model, pinned, start, labels, principal, ticket
                )
            else:
                async with self.large:
                    content, json_length, observed = await self._infer(
                        headers, body, receive, model, pinned, start, labels, principal, ticket
                    )
            code = "200"
        except (ClientDisconnect, ClientGone):
            code = CLIENT_CLOSED
            return
        except Exception as exc:
            failure = await handler_for(exc)(Request(scope, receive), exc)
            code = str(failure.status_code)
            if isinstance(exc, RateLimited):  # the client's own limit (SLO rules leave it out)
                labels[2] = LIMITED
            elif labels[3] and isinstance(exc, Timeout) and judged(labels[2], "504"):
                traffic.client_timeouts[(labels[0], labels[1])] += 1
        finally:
            traffic.inflight[label] -= 1
            traffic.requests[(labels[0], labels[1], labels[2], code)] += 1
        if failure is not None:
            await failure(scope, receive, send)
            return
        if json_length is None:
            response_headers = [*_JSON, (b"content-length", b"%d" % len(content))]
        else:
            response_headers = [
                *_BINARY,
                (b"content-length", b"%d" % len(content)),
                (b"inference-header-content-length", b"%d" % json_length),
            ]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": content})
        # After the answer is on its way: the request that fills the monitor's buffer does not
        # wait for the flush. While a model's policy has guards, requests pinned to a version by
        # the client do not feed the monitors, whose latency and drift windows the guards judge.
        if labels[2] != "pinned" or not self._guarded(model):
            self.observe(*observed)

    def _guarded(self, model: str) -> bool:
        route = self.table.get(model)
        return route is not None and route.doc.guards is not None

    async def _infer(
        self,
        headers: Headers,
        body: bytes,
        receive: Receive,
        model: str,
        pinned: str | None,
        start: float,
        labels: list[str],
        principal: str,
        ticket: Ticket | None,
    ) -> tuple[bytes, int | None, Observation]:
        """The response body, its JSON header length (None: all JSON) and what to observe."""
        settings = self.settings
        budget = settings.max_decoded_bytes
        header_length = codec.parse_header_length(headers.get("inference-header-content-length"))
        offload = len(body) >= OFFLOADED_BODY
        if offload:
            envelope = await asyncio.get_running_loop().run_in_executor(
                self.decoder, codec.parse_request, body, header_length, budget
            )
        else:
            envelope = codec.parse_request(body, header_length, budget)
        route = decision = None
        role = "pinned"
        if pinned is None and self.settings.version_override:
            pinned = headers.get("x-turnout-version")
        try:
            if pinned is not None:  # pinned requests bypass the router
                loaded = self.registry.get(model, pinned)
            else:
                route = self.table.get(model)
                if route is None:
                    loaded = self.registry.latest(model)
                    role = "default"
                else:
                    decision = RouteTable.choose(route, headers, envelope.parameters, principal)
                    loaded = self.registry.get(model, decision.version)
                    role = decision.arm_role
        except NotFound:
            if not self.registry.started:  # the start-up load may not have reached it yet
                raise NotReady("the gateway is still loading its models; retry shortly") from None
            raise
        info = loaded.info
        labels[1], labels[2] = info.version, role
        limits = (settings.max_tensor_elements, settings.max_batch_rows, budget)
        if offload:
            decoded = await asyncio.get_running_loop().run_in_executor(
                self.decoder, codec.decode_inputs, envelope, info, *limits
            )
        else:
            decoded = codec.decode_inputs(envelope, info, *limits)
        timeout_us = decoded.parameters.get("timeout")
        # Without one, the runtime gives a queued request the default (--request-timeout-ms).
        deadline = None if timeout_us is None else self._deadline(timeout_us, labels)
        if ticket is not None:
            await ticket.before_run(decoded.inputs, loaded)
        with loaded:
            model_start = time.perf_counter()
            outputs = await loaded.runtime.run(
                decoded.inputs,
                codec.output_names(decoded, info),
                deadline=deadline,
                receive=receive,
            )
            model_s = time.perf_counter() - model_start
        max_bytes = settings.max_response_bytes
        size = 0
        for array in outputs.values():  # numeric outputs by their size; strings by output_bytes
            if array.dtype.kind == "O":
                size = codec.output_bytes(outputs, max_bytes)
                break
            size += array.nbytes
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the outputs of model {info.model!r} version {info.version} for this request "
                f"take at least {size} bytes, above the limit of "
                f"{max_bytes} per response (--max-response-bytes); "
                "send fewer rows, or inputs that ask for less"
            )
        # 128 random bits as 32 hex digits, as uuid4().hex, at a quarter of its cost (0.5 µs)
        request_id = decoded.id if decoded.id is not None else os.urandom(16).hex()
        if info.task is not None and role != "pinned" and self.quality is not None:
            # routed: remembered for its outcome when the client sent an id (a generated one was
            # never seen by the client, who could not post its outcome)
            self.quality.served(info, outputs, decoded.id)
        parameters = None
        if route is not None and decision is not None:
            self.table.served(route, decision, request_id)
            parameters = {
                "propensity": decision.propensity,
                "policy_revision": route.revision,
                "route_role": decision.arm_role,
            }
            if decision.shadows:
                self.shadows.submit(model, info.version, decision.shadows, decoded.inputs, outputs)
        if self.record is not None:
            self.record(
                request_id, decoded.id, info, role, None if route is None else route.revision,
                None if decision is None else decision.propensity, decoded.inputs, outputs,
                principal,
            )  # fmt: skip
        content, json_length = codec.encode_response(
            info.model, info.version, request_id, outputs, decoded, info.output_specs, parameters
        )
        total_s = time.perf_counter() - start
        return content, json_length, (loaded, decoded.inputs, outputs, total_s, model_s)

    def _deadline(self, timeout_us: Any, labels: list[str]) -> float:
        """From the request's ``timeout`` parameter (microseconds, as Triton's). A client's own
        deadline below the guards' floor marks the request (``labels[3]``): its 504 is the
        client's choice."""
        if type(timeout_us) is not int or timeout_us <= 0:
            raise BadRequest('"parameters.timeout" must be a positive integer (microseconds)')
        if timeout_us < self.settings.guard_deadline_floor_ms * 1000:
            labels[3] = CLIENT_DEADLINE
        return time.monotonic() + timeout_us / 1e6

    def _observe(
        self,
        loaded: Loaded,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        total_s: float,
        model_s: float,
    ) -> None:
        """Feed the version's monitor (which only buffers: it never fails the request)."""
        features = inputs.get(loaded.drift_input) if loaded.drift_input else None
        loaded.monitor.observe(features, outputs, total_s, model_s, time.monotonic())
