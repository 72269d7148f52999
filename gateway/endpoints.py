"""Thin HTTP handlers: decode -> route -> run -> encode. No business logic lives here."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import codec
from gateway.auth import KeyCheck, OpenAccess, TokenAuth
from gateway.errors import (
    BadRequest,
    Conflict,
    GatewayError,
    NotFound,
    NotReady,
    PayloadTooLarge,
)
from gateway.fleet import CountsExchange
from gateway.metrics import Traffic
from gateway.registry import Loaded, Registry
from gateway.settings import Settings
from gateway.shadow import ShadowRunner
from router.policies import PolicyError
from router.store import StoreUnavailable
from router.table import RouteTable, UnknownInference

log = logging.getLogger("turnout.endpoints")

SERVER_NAME = "turnout"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
PLATFORM = "onnxruntime_onnx"


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
        return await request.body()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int = 1 << 20) -> dict[str, Any]:
    """A small JSON object body (admin and feedback calls); an empty body is ``{}``."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


Observe = Callable[[Loaded, dict[str, np.ndarray], dict[str, np.ndarray], float, float], None]


def _unobserved(
    loaded: Loaded,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    total_s: float,
    model_s: float,
) -> None:
    """The monitor of a gateway whose monitors are off."""


class Endpoints:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        table: RouteTable,
        shadows: ShadowRunner,
        auth: TokenAuth,
        traffic: Traffic,
        keys: KeyCheck | None = None,
    ) -> None:
        self.traffic = traffic
        self.exchange: CountsExchange | None = None  # set by the app
        # API keys guard inference, model metadata, drift and feedback; health stays open.
        self.keys: KeyCheck = keys or OpenAccess()
        self.settings = settings
        self.registry = registry
        self.table = table
        self.shadows = shadows
        self.auth = auth
        self.started = False
        # Versions a routing policy needs; unload refuses them (set by the app).
        self.referenced: Callable[[str], frozenset[str]] = lambda model: frozenset()
        # Chosen once: with monitors off the hot path calls a function that does nothing.
        self.observe: Observe = self._observe if settings.monitors else _unobserved

    # -- health and metadata ---------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = (
            self.started
            and self.table.synced.is_set()
            and bool(self.registry.loaded() or not self.registry.models())
        )
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    async def model_metadata(self, request: Request) -> Response:
        self.keys.check(request.headers)
        model = request.path_params["model"]
        version = request.path_params.get("version")
        loaded = self.registry.get(model, version) if version else self.registry.latest(model)
        return json_response(self._metadata(loaded, pinned=version is not None))

    async def model_ready(self, request: Request) -> Response:
        model = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            if version:
                self.registry.get(model, version)
            else:
                self.registry.latest(model)
        except NotReady:
            return json_response({"name": model, "ready": False}, 503)
        return json_response({"name": model, "ready": True})

    async def drift(self, request: Request) -> Response:
        self.keys.check(request.headers)
        loaded = self.registry.get(request.path_params["model"], request.path_params["version"])
        if not self.settings.monitors:
            raise NotFound("drift is not measured: this gateway runs with monitors off")
        scope = request.query_params.get("scope", "group")
        if scope not in ("process", "group", "fleet"):
            raise BadRequest("scope: one of process, group, fleet")
        key = (loaded.info.model, loaded.info.version)
        if self.exchange is None:
            counts = loaded.monitor.export(time.monotonic())
            members = 1
        else:
            view = await self.exchange.view(scope)  # type: ignore[arg-type]
            counts, members = view.monitors[key], view.members
        return json_response(
            {
                "model": loaded.info.model,
                "version": loaded.info.version,
                "scope": scope,
                "processes": members,
                **loaded.monitor.report(counts),
            }
        )

    def _metadata(self, loaded: Loaded, pinned: bool) -> dict[str, Any]:
        info = loaded.info
        return {
            "name": info.model,
            "versions": [info.version] if pinned else self.registry.ready_versions(info.model),
            "platform": PLATFORM,
            "inputs": [s.as_json() for s in info.inputs],
            "outputs": [s.as_json() for s in info.outputs],
            "turnout": {"version": info.version, "sha256": info.sha256, "metadata": info.metadata},
        }

    # -- inference ---------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        model: str = request.path_params["model"]
        inflight = self.traffic.inflight
        inflight[model] += 1
        labels = [model, "", "unknown"]  # version and role filled in once routed
        code = "500"
        try:
            response = await self._infer(request, model, start, labels)
            code = "200"
            return response
        except GatewayError as exc:
            code = str(exc.status)
            raise
        finally:
            inflight[model] -= 1
            self.traffic.requests[(labels[0], labels[1], labels[2], code)] += 1

    async def _infer(
        self, request: Request, model: str, start: float, labels: list[str]
    ) -> Response:
        pinned = request.path_params.get("version")
        self.keys.check(request.headers)  # before the body is read
        body = await read_body(request, self.settings.max_body_bytes)
        envelope = codec.parse_request(
            body, codec.parse_header_length(request.headers.get("inference-header-content-length"))
        )
        route = decision = None
        role = "pinned"
        if pinned is None and self.settings.version_override:
            pinned = request.headers.get("x-turnout-version")
        try:
            if pinned is not None:  # pinned requests bypass the router
                loaded = self.registry.get(model, pinned)
            else:
                route = self.table.get(model)
                if route is None:
                    loaded = self.registry.latest(model)
                    role = "default"
                else:
                    decision = RouteTable.choose(route, request.headers, envelope.parameters)
                    loaded = self.registry.get(model, decision.version)
                    role = decision.arm_role
        except NotFound:
            if not self.started:  # unknown so far: the start-up load may not have reached it
                raise NotReady("the gateway is still loading its models; retry shortly") from None
            raise
        info = loaded.info
        labels[1], labels[2] = info.version, role
        decoded = codec.decode_inputs(
            envelope, info, self.settings.max_tensor_elements, self.settings.max_batch_rows
        )
        deadline = self._deadline(decoded.parameters)
        with loaded:
            model_start = time.perf_counter()
            outputs = await loaded.runtime.run(
                decoded.inputs, codec.output_names(decoded, info), deadline=deadline
            )
            model_s = time.perf_counter() - model_start
        # 128 random bits as 32 hex digits, as uuid4().hex, at a quarter of its cost (0.5 µs)
        request_id = decoded.id if decoded.id is not None else os.urandom(16).hex()
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
        content, json_length = codec.encode_response(
            info.model, info.version, request_id, outputs, decoded, info.output_specs, parameters
        )
        if json_length is None:
            response = Response(content, media_type="application/json")
        else:
            response = Response(
                content,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(json_length)},
            )
        self.observe(loaded, decoded.inputs, outputs, time.perf_counter() - start, model_s)
        return response

    def _deadline(self, parameters: dict[str, Any]) -> float | None:
        """From the request's ``timeout`` parameter (microseconds, as Triton's), else the
        configured default; None when neither is set."""
        timeout_us = parameters.get("timeout")
        if timeout_us is None:
            default_ms = self.settings.request_timeout_ms
            return time.monotonic() + default_ms / 1e3 if default_ms else None
        if type(timeout_us) is not int or timeout_us <= 0:
            raise BadRequest('"parameters.timeout" must be a positive integer (microseconds)')
        return time.monotonic() + timeout_us / 1e6

    def _observe(
        self,
        loaded: Loaded,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        total_s: float,
        model_s: float,
    ) -> None:
        """Feed the version's monitor; a monitor problem never fails the request."""
        features = inputs.get(loaded.drift_input) if loaded.drift_input else None
        try:
            loaded.monitor.observe(features, outputs, total_s, model_s, time.monotonic())
        except ValueError as exc:  # a tensor whose columns differ from the reference
            info = loaded.info
            log.debug("monitor skipped a request of %s/%s: %s", info.model, info.version, exc)

    async def feedback(self, request: Request) -> Response:
        self.keys.check(request.headers)
        model = request.path_params["model"]
        body = await read_json_object(request)
        request_id, reward = body.get("id"), body.get("reward")
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest("id: required, the id of an inference response")
        if not isinstance(reward, int | float) or isinstance(reward, bool):
            raise BadRequest("reward: required, a number")
        try:
            assignment = await self.table.feedback(model, request_id, float(reward))
        except UnknownInference as exc:
            raise NotFound(str(exc)) from None
        except PolicyError as exc:
            raise BadRequest(str(exc)) from None
        except StoreUnavailable as exc:
            raise NotReady(f"feedback store unavailable: {exc}") from None
        return json_response(
            {"id": request_id, "model": model, "version": assignment.version, "reward": reward}
        )

    # -- repository extension (admin) --------------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        body = await read_json_object(request)
        if type(body.get("ready", False)) is not bool:
            raise BadRequest("'ready' must be true or false")
        entries = self.registry.index()
        if body.get("ready") is True:
            entries = [e for e in entries if e["state"] == "READY"]
        return json_response(entries)

    async def repository_load(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        model = request.path_params["model"]
        versions = self._versions_parameter(await read_json_object(request))
        await self.registry.load(model, versions)
        entries = [e for e in self.registry.index() if e["name"] == model]
        failed = [
            e
            for e in entries
            if e["state"] == "FAILED" and (not versions or e["version"] in versions)
        ]
        if failed:
            reasons = "; ".join(f"version {e['version']}: {e['reason']}" for e in failed)
            raise BadRequest(f"failed to load model {model!r}: {reasons}")
        return json_response({"name": model, "versions": entries})

    async def repository_unload(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        model = request.path_params["model"]
        versions = self._versions_parameter(await read_json_object(request))
        needed = self.referenced(model) & set(versions or self.registry.ready_versions(model))
        if needed:
            raise Conflict(
                f"model {model!r} versions {sorted(needed, key=int)} are named by its routing "
                "policy: change the policy first"
            )
        await self.registry.unload(model, versions)
        entries = [e for e in self.registry.index() if e["name"] == model]
        return json_response({"name": model, "versions": entries})

    @staticmethod
    def _versions_parameter(body: dict[str, Any]) -> list[str] | None:
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        versions = parameters.get("versions")
        if versions is None:
            return None
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise BadRequest("'parameters.versions' must be a list of version strings")
        if not versions:
            raise BadRequest("'parameters.versions' must not be empty")
        return versions
