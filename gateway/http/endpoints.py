"""The other OIP and Turnout endpoints: health, metadata, drift, feedback and the repository
extension. Inference has its own path (gateway.http.inference)."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.background.fleet import CountsExchange
from gateway.errors import BadRequest, Conflict, NotFound, NotReady, cut
from gateway.http.access import Access
from gateway.http.auth import KeyCheck, OpenAccess
from gateway.http.responses import json_response, read_json_object
from gateway.http.triton import PLATFORM
from gateway.serving.registry import Loaded, Registry
from gateway.settings import Settings
from router.state.join import MAX_ID_CHARS
from router.state.table import RouteTable

log = logging.getLogger("turnout.endpoints")

SERVER_NAME = "turnout"
SERVER_VERSION = "0.1.0"
# The server metadata's extensions: exactly the Triton/KServe extensions this gateway serves
# (docs/api.md lists each with its endpoints). The one place they are declared.
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
# What a repository call's "parameters" may hold; anything else is refused (400) by name, never
# ignored: Triton's "config" and "file:<path>" overrides of a load are not supported.
LOAD_PARAMETERS = frozenset({"versions"})
# unload_dependents: Turnout has no ensembles, so no version has dependents to unload.
UNLOAD_PARAMETERS = frozenset({"versions", "unload_dependents"})
SHOWN_PARAMETERS = 3  # refused parameters a message names


class Endpoints:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        table: RouteTable,
        access: Access,
        keys: KeyCheck | None = None,
        exchange: CountsExchange | None = None,
        feedback_keys: KeyCheck | None = None,
    ) -> None:
        self.exchange = exchange
        # API keys guard inference, model metadata, drift and feedback; health stays open.
        self.keys: KeyCheck = keys or OpenAccess()
        # Feedback's own keys when configured (rewards steer policies), else the API keys.
        self.feedback_keys: KeyCheck = feedback_keys or self.keys
        self.settings = settings
        self.registry = registry
        self.table = table
        self.access = access

    # -- health and metadata ---------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = (
            self.registry.started
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

    async def feedback(self, request: Request) -> Response:
        self.feedback_keys.check(request.headers)
        model = request.path_params["model"]
        body = await read_json_object(request)
        request_id, reward = body.get("id"), body.get("reward")
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest("id: required, the id of an inference response")
        if len(request_id) > MAX_ID_CHARS:
            raise BadRequest(
                f"id: at most {MAX_ID_CHARS} characters (no inference has a longer one), "
                f"got {len(request_id)}"
            )
        if not isinstance(reward, int | float) or isinstance(reward, bool):
            raise BadRequest("reward: required, a number")
        assignment, duplicate = await self.table.feedback(model, request_id, float(reward))
        return json_response(
            {
                "id": request_id,
                "model": model,
                "version": assignment.version,
                "reward": reward,
                "duplicate": duplicate,
            }
        )

    # -- repository extension (admin) --------------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        self.access.require(request)
        body = await read_json_object(request)
        if type(body.get("ready", False)) is not bool:
            raise BadRequest("'ready' must be true or false")
        entries = self.registry.index()
        if body.get("ready") is True:
            entries = [e for e in entries if e["state"] == "READY"]
        return json_response(entries)

    async def repository_load(self, request: Request) -> Response:
        self.access.require(request)
        model = request.path_params["model"]
        versions = self._versions_parameter(await read_json_object(request), LOAD_PARAMETERS)
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
        self.access.require(request)
        model = request.path_params["model"]
        versions = self._versions_parameter(await read_json_object(request), UNLOAD_PARAMETERS)
        route = self.table.get(model)
        referenced = route.doc.versions() if route is not None else frozenset()
        needed = referenced & set(versions or self.registry.ready_versions(model))
        if needed:
            raise Conflict(
                f"model {model!r} versions {sorted(needed, key=int)} are named by its routing "
                "policy: change the policy first"
            )
        await self.registry.unload(model, versions)
        entries = [e for e in self.registry.index() if e["name"] == model]
        return json_response({"name": model, "versions": entries})

    @staticmethod
    def _versions_parameter(body: dict[str, Any], allowed: frozenset[str]) -> list[str] | None:
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        refused = [name for name in parameters if name not in allowed]
        if refused:
            raise BadRequest(_unsupported(refused, allowed))
        dependents = parameters.get("unload_dependents", False)
        if type(dependents) is not bool:
            raise BadRequest("'parameters.unload_dependents' must be true or false")
        versions = parameters.get("versions")
        if versions is None:
            return None
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise BadRequest("'parameters.versions' must be a list of version strings")
        if not versions:
            raise BadRequest("'parameters.versions' must not be empty")
        return versions


def _unsupported(names: list[str], allowed: frozenset[str]) -> str:
    """Why a repository call's parameters ``names`` are refused: each named (at most
    SHOWN_PARAMETERS of them, each cut), with the reason."""
    reasons = []
    for name in names[:SHOWN_PARAMETERS]:
        if name == "config":
            why = (
                "loading with a configuration sent in the request is not supported: a "
                "version's batching comes from the config.json in its repository folder"
            )
        elif name.startswith("file:"):
            why = (
                "loading files sent in the request is not supported: put the version's folder "
                "in the model repository, then load it"
            )
        else:
            why = "unknown parameter"
        reasons.append(f"'parameters.{cut(name, 100)}': {why}")
    if len(names) > SHOWN_PARAMETERS:
        reasons.append(f"and {len(names) - SHOWN_PARAMETERS} more")
    return f"{'; '.join(reasons)} (supported: {', '.join(sorted(allowed))})"
