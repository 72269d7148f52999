"""Admin API: routing policies, actions, reports and the audit trail. Every write names who
(the token's name), why (a required reason) and the exact artifacts (sha256) it routes to."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import TokenAuth
from gateway.errors import BadRequest, Conflict, NotFound, NotReady, PreconditionFailed
from gateway.registry import Registry
from gateway.responses import json_response, read_json_object
from gateway.shadow import ShadowRunner
from router.guards import MONITORED
from router.policies import ActionConflict, PolicyError
from router.spec import ACTIONS, apply_action, build_policy, parse_policy, referenced_versions
from router.stats import Outcomes, msprt, srm_test
from router.store import RouteRecord, StaleRevision, StoreUnavailable
from router.table import Route, RouteTable

_ADMIN_BODY_LIMIT = 1 << 20


class Admin:
    def __init__(
        self,
        auth: TokenAuth,
        registry: Registry,
        table: RouteTable,
        shadows: ShadowRunner,
        *,
        monitors: bool = True,
    ) -> None:
        self.auth = auth
        self.monitors = monitors
        self.registry = registry
        self.table = table
        self.shadows = shadows

    # -- reads ----------------------------------------------------------------------------------
    async def list_routes(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        revision, records = await _store(self.table.store.routes())
        return json_response(
            {"revision": revision, "routes": {m: _describe(r) for m, r in sorted(records.items())}}
        )

    async def get_route(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        record = await self._record(request.path_params["model"])
        return _with_etag(_describe(record), record.revision)

    async def audit(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        model = request.query_params.get("model") or None
        raw_limit = request.query_params.get("limit", "100")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 10_000:
            raise BadRequest("limit: must be an integer between 1 and 10000")
        entries = await _store(self.table.store.audit(model, int(raw_limit)))
        return json_response({"entries": [dataclasses.asdict(e) for e in entries]})

    async def report(self, request: Request) -> Response:
        self.auth.authenticate(request.headers.get("authorization"))
        model = request.path_params["model"]
        route = self.table.get(model)
        if route is None:
            raise NotFound(f"model {model!r} has no routing policy")
        await _store(self.table.flush())
        stats = await _store(self.table.store.stats(model, route.revision))
        return json_response({**_report(route, stats), "shadows": self.shadows.report(model)})

    # -- writes ---------------------------------------------------------------------------------
    async def put_route(self, request: Request) -> Response:
        who = self.auth.authenticate(request.headers.get("authorization"))
        model = self._model(request)
        body = await read_json_object(request, _ADMIN_BODY_LIMIT)
        reason = _reason(body)
        unknown = sorted(set(body) - {"policy", "reason"})
        if unknown:
            raise BadRequest(
                f"{', '.join(unknown)}: unknown field (expected 'policy' and 'reason')"
            )
        if "policy" not in body:
            raise BadRequest("policy: required")
        doc = _parse(body["policy"], self.registry.ready_versions(model))
        blind = [c for c in MONITORED if c in doc.get("guards", {})] if not self.monitors else []
        if blind:  # a guard that could never see its figures would never act: refuse it
            raise BadRequest(
                f"policy.guards.{blind[0]}: needs the inline monitors, which are off on this "
                "gateway (TURNOUT_MONITORS=false)"
            )
        if request.query_params.get("dry_run", "false").lower() in ("true", "1", "yes"):
            policy = build_policy(doc, salt=model)
            current = self.table.get(model)
            return json_response(
                {
                    "dry_run": True,
                    "model": model,
                    "policy": doc,
                    "shares": policy.shares(),
                    "revision": current.revision if current else 0,
                    "artifacts": self._artifacts(model, doc),
                }
            )
        record = await self.apply(model, doc, _if_match(request), who, "put", reason)
        assert record is not None
        return _with_etag(_describe(record), record.revision)

    async def delete_route(self, request: Request) -> Response:
        who = self.auth.authenticate(request.headers.get("authorization"))
        model = self._model(request)
        reason = _reason(await read_json_object(request, _ADMIN_BODY_LIMIT))
        current = await self._record(model)
        expected = _if_match(request)
        await self.apply(
            model, None, current.revision if expected is None else expected, who, "delete", reason
        )
        return json_response({"model": model, "deleted": True})

    async def action(self, request: Request) -> Response:
        who = self.auth.authenticate(request.headers.get("authorization"))
        model = self._model(request)
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise NotFound(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
        reason = _reason(await read_json_object(request, _ADMIN_BODY_LIMIT))
        current = await self._record(model)
        expected = _if_match(request)
        try:
            new_doc = apply_action(current.doc, action)
        except ActionConflict as exc:
            raise Conflict(str(exc)) from None
        except PolicyError as exc:
            raise BadRequest(str(exc)) from None
        doc = _parse(new_doc, self.registry.ready_versions(model))
        record = await self.apply(
            model, doc, current.revision if expected is None else expected, who, action, reason
        )
        assert record is not None
        return _with_etag(_describe(record), record.revision)

    async def apply(
        self,
        model: str,
        doc: dict[str, Any] | None,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> RouteRecord | None:
        """Write a change (also used by automated actions) and install it locally at once."""
        artifacts = self._artifacts(model, doc) if doc is not None else {}
        try:
            record = await self.table.store.put_route(
                model, doc, expected=expected, who=who, action=action, reason=reason,
                artifacts=artifacts, details=details,
            )  # fmt: skip
        except StaleRevision as exc:
            raise PreconditionFailed(
                f"the policy of {model!r} is at revision {exc.current}, not {exc.expected}; "
                "read it again and retry"
            ) from None
        except StoreUnavailable as exc:
            raise NotReady(f"routing state store unavailable, nothing changed: {exc}") from None
        self.table.install(record, model)
        return record

    # -- helpers ----------------------------------------------------------------------------------
    def _model(self, request: Request) -> str:
        model: str = request.path_params["model"]
        if not self.registry.known(model):
            raise NotFound(f"unknown model {model!r}")
        return model

    async def _record(self, model: str) -> RouteRecord:
        _, records = await _store(self.table.store.routes())
        record: RouteRecord | None = records.get(model)
        if record is None:
            raise NotFound(f"model {model!r} has no routing policy")
        return record

    def _artifacts(self, model: str, doc: dict[str, Any]) -> dict[str, str]:
        return {
            v: self.registry.get(model, v).info.sha256 for v in sorted(referenced_versions(doc))
        }

    def referencing(self, model: str) -> frozenset[str]:
        """Versions the model's current policy needs loaded (unload refuses them)."""
        route = self.table.get(model)
        return referenced_versions(route.doc) if route is not None else frozenset()


async def _store(awaitable: Any) -> Any:
    try:
        return await awaitable
    except StoreUnavailable as exc:
        raise NotReady(f"routing state store unavailable: {exc}") from None


def _parse(doc: Any, loaded: list[str]) -> dict[str, Any]:
    try:
        return parse_policy(doc, loaded)
    except PolicyError as exc:
        raise BadRequest(
            f"policy.{exc}" if not str(exc).startswith("policy") else str(exc)
        ) from None


def _describe(record: RouteRecord) -> dict[str, Any]:
    return {
        "model": record.model,
        "revision": record.revision,
        "policy": record.doc,
        "shares": build_policy(record.doc, salt=record.model).shares(),
    }


def _with_etag(content: dict[str, Any], revision: int) -> Response:
    response = json_response(content)
    response.headers["ETag"] = f'"{revision}"'
    return response


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise BadRequest(f"If-Match must be a revision number, got {raw[:40]!r}")
    return int(value)


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest(
            "reason: required, a non-empty string saying why (kept in the audit trail)"
        )
    if len(reason) > 2000:
        raise BadRequest("reason: at most 2000 characters")
    return reason.strip()


def _report(route: Route, stats: dict[str, Any]) -> dict[str, Any]:
    shares = route.policy.shares()
    versions = sorted(set(shares) | set(stats), key=int)
    served = {v: stats[v].served if v in stats else 0 for v in versions}
    total = sum(served.values())
    rows = []
    for v in versions:
        s = stats.get(v)
        n = s.rewards if s else 0
        rows.append(
            {
                "version": v,
                "served": served[v],
                "expected_share": shares.get(v, 0.0),
                "observed_share": served[v] / total if total else None,
                "feedback": n,
                "reward_mean": (s.reward_sum / n) if s and n else None,
            }
        )
    out: dict[str, Any] = {"model": route.model, "revision": route.revision,
                           "strategy": route.strategy, "versions": rows}  # fmt: skip
    weighted = {v: w for v, w in shares.items() if w > 0}
    if route.strategy in ("ab", "canary") and len(weighted) > 1 and total > 0:
        chi2, p, flagged = srm_test({v: served.get(v, 0) for v in weighted}, weighted)
        out["srm"] = {"chi2": chi2, "p_value": p, "flagged": flagged, "alpha": 0.001}
    arms = [v for v in versions if stats.get(v) and stats[v].rewards >= 2]
    if len(arms) >= 2:
        control = arms[0]
        c = stats[control]
        tests = []
        for v in arms[1:]:
            t = stats[v]
            result = msprt(
                Outcomes(c.rewards, c.reward_sum, c.reward_sumsq),
                Outcomes(t.rewards, t.reward_sum, t.reward_sumsq),
                alpha=0.05,
            )
            tests.append({"control": control, "treatment": v, **dataclasses.asdict(result)})
        out["significance"] = {
            "test": "mSPRT: always-valid p-value and confidence sequence (alpha 0.05)",
            "comparisons": tests,
        }
    return out
