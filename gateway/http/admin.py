"""Admin API: routing policies, actions, reports, guards and the audit trail. Every write names
who (the token's name), why (a required reason) and the exact artifacts (sha256) it routes to;
it goes through ``RouteTable.write``, as the guards' own changes do."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.background.events import KINDS, Events, kinds_matching
from gateway.background.guards import GuardEvaluator
from gateway.background.shadow import ShadowRunner
from gateway.errors import BadRequest, NotFound, cut
from gateway.http.access import Access
from gateway.http.fields import integer
from gateway.http.limits import Limits
from gateway.http.responses import json_response, read_json_object
from gateway.serving.registry import Registry
from router.policy.guard_spec import MONITORED
from router.policy.policies import PolicyError
from router.policy.spec import ACTIONS, Action, PolicyDoc, parse_policy
from router.policy.stats import Outcomes, msprt, srm_test
from router.state.store import RouteRecord
from router.state.table import Route, RouteTable

_ADMIN_BODY_LIMIT = 1 << 20
MAX_AUDIT_PAGE = 1000  # entries per audit page (``limit``)
_MAX_REVISION = (1 << 63) - 1  # Redis counters are signed 64-bit


class Admin:
    def __init__(
        self,
        access: Access,
        registry: Registry,
        table: RouteTable,
        shadows: ShadowRunner,
        guards: GuardEvaluator,
        limits: Limits,
        *,
        monitors: bool = True,
        events: Events | None = None,
    ) -> None:
        self.access = access
        self.events = events
        self.monitors = monitors
        self.registry = registry
        self.table = table
        self.shadows = shadows
        self.guards = guards
        self.limits = limits

    # -- reads ----------------------------------------------------------------------------------
    async def list_routes(self, request: Request) -> Response:
        self.access.require(request)
        revision, records = await self.table.store.routes()
        return json_response(
            {"revision": revision, "routes": {m: _describe(r) for m, r in sorted(records.items())}}
        )

    async def get_route(self, request: Request) -> Response:
        self.access.require(request)
        record = await self._record(request.path_params["model"])
        return _with_etag(_describe(record), record.revision)

    async def audit(self, request: Request) -> Response:
        query = request.query_params
        model = query.get("model") or None
        self.access.require(request, model)
        limit = integer("limit", query.get("limit", "100"), MAX_AUDIT_PAGE, minimum=1)
        raw_cursor = query.get("cursor")
        cursor = None if raw_cursor is None else integer("cursor", raw_cursor, _MAX_REVISION, 1)
        page = await self.table.store.audit_page(model, limit, cursor)
        # The stored JSON as it is: no decode and re-encode of up to a MiB on the event loop.
        following = b"null" if page.next is None else b'"%d"' % page.next
        body = b'{"entries":[' + b",".join(page.entries) + b'],"next":' + following + b"}"
        return Response(body, media_type="application/json")

    async def events_page(self, request: Request) -> Response:
        """GET /admin/events: the recent events, newest first, a page at a time (``limit`` at
        most 1000, ``cursor`` the ``next`` of the page before), of one ``kind`` or a pattern of
        kinds (``model.*``)."""
        self.access.require(request)
        query = request.query_params
        limit = integer("limit", query.get("limit", "100"), MAX_AUDIT_PAGE, minimum=1)
        raw_cursor = query.get("cursor")
        cursor = None if raw_cursor is None else integer("cursor", raw_cursor, _MAX_REVISION, 1)
        kind = query.get("kind")
        kinds = None
        if kind is not None:
            kinds = kinds_matching(kind) if len(kind) <= 64 else frozenset()
            if not kinds:
                raise BadRequest(
                    f"kind: {cut(kind, 64)!r} is no event kind nor a pattern of kinds "
                    f"(kinds: {', '.join(KINDS)})"
                )
        if self.events is None:
            return json_response({"events": [], "next": None})
        page = await self.events.page(cursor, limit, kinds)
        # The stored JSON as it is, as for the audit trail.
        following = b"null" if page.next is None else b'"%d"' % page.next
        body = b'{"events":[' + b",".join(e.body for e in page.entries) + b'],"next":'
        return Response(body + following + b"}", media_type="application/json")

    async def report(self, request: Request) -> Response:
        self.access.require(request)
        model = request.path_params["model"]
        route = self.table.get(model)
        if route is None:
            raise NotFound(f"model {cut(model)!r} has no routing policy")
        await self.table.flush()
        stats = await self.table.store.stats(model, route.revision)
        return json_response({**_report(route, stats), "shadows": self.shadows.report(model)})

    async def guards_view(self, request: Request) -> Response:
        """GET /admin/routes/{model}/guards: the verdict on this replica's current windows, the
        figures and thresholds behind it, and the last action any guard took on the model."""
        self.access.require(request)
        return json_response(await self.guards.view(request.path_params["model"]))

    async def get_limits(self, request: Request) -> Response:
        """GET /admin/limits: the rate-limits document in force (null: none)."""
        self.access.require(request)
        return json_response({"limits": self.limits.doc_json})

    # -- writes ---------------------------------------------------------------------------------
    async def put_limits(self, request: Request) -> Response:
        """PUT /admin/limits ``{"limits": {...}, "reason": "..."}``: validated whole, stored
        with its audit entry (``GET /admin/audit?model=_limits``), in force at once here and
        within ``publish_s`` on the other replicas."""
        who = self.access.require(request)
        limits, reason = await _change(request, "limits")
        try:
            doc = await self.limits.put(limits, who, reason)
        except PolicyError as exc:
            field = exc.field if exc.field.startswith("limits") else f"limits.{exc.field}"
            raise PolicyError(field, exc.message) from None
        return json_response({"limits": doc})

    async def put_route(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        policy, reason = await _change(request, "policy")
        doc = _parse(policy, self.registry.ready_versions(model))
        thresholds = doc.guards.thresholds() if doc.guards is not None else {}
        blind = [c for c in MONITORED if c in thresholds] if not self.monitors else []
        if blind:  # a guard that could never see its figures would never act: refuse it
            raise BadRequest(
                f"policy.guards.{blind[0]}: needs the inline monitors, which are off on this "
                "gateway (TURNOUT_MONITORS=false)"
            )
        if request.query_params.get("dry_run", "false").lower() in ("true", "1", "yes"):
            current = self.table.get(model)
            return json_response(
                {
                    "dry_run": True,
                    "model": model,
                    "policy": doc.as_json(),
                    "shares": doc.policy(salt=model).shares(),
                    "revision": current.revision if current else 0,
                    "artifacts": self.registry.artifacts(model, doc.versions()),
                }
            )
        record = await self._write(model, doc, _if_match(request), who, "put", reason)
        assert record is not None
        return _with_etag(_describe(record), record.revision)

    async def delete_route(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        reason = _reason(await read_json_object(request, _ADMIN_BODY_LIMIT))
        current = await self._record(model)
        expected = _if_match(request)
        await self._write(
            model, None, current.revision if expected is None else expected, who, "delete", reason
        )
        return json_response({"model": model, "deleted": True})

    async def action(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        action: Action = request.path_params["action"]
        if action not in ACTIONS:
            raise NotFound(f"unknown action {cut(action)!r} (one of {', '.join(ACTIONS)})")
        reason = _reason(await read_json_object(request, _ADMIN_BODY_LIMIT))
        current = await self._record(model)
        expected = _if_match(request)
        after = parse_policy(current.doc).apply(action)
        doc = _parse(after.as_json(), self.registry.ready_versions(model))
        record = await self._write(
            model, doc, current.revision if expected is None else expected, who, action, reason
        )
        assert record is not None
        return _with_etag(_describe(record), record.revision)

    async def _write(
        self,
        model: str,
        doc: PolicyDoc | None,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
    ) -> RouteRecord | None:
        artifacts = self.registry.artifacts(model, doc.versions()) if doc is not None else {}
        return await self.table.write(
            model, doc, expected=expected, who=who, action=action, reason=reason,
            artifacts=artifacts,
        )  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------------
    def _model(self, request: Request) -> str:
        model: str = request.path_params["model"]
        if not self.registry.known(model):
            raise NotFound(f"unknown model {cut(model)!r}")
        return model

    async def _record(self, model: str) -> RouteRecord:
        _, records = await self.table.store.routes()
        record: RouteRecord | None = records.get(model)
        if record is None:
            raise NotFound(f"model {cut(model)!r} has no routing policy")
        return record


def _parse(doc: Any, loaded: list[str]) -> PolicyDoc:
    """The document of a request body's ``policy`` field: errors name fields from the body."""
    try:
        return parse_policy(doc, loaded)
    except PolicyError as exc:
        field = exc.field if exc.field.startswith("policy") else f"policy.{exc.field}"
        raise PolicyError(field, exc.message) from None


def _describe(record: RouteRecord) -> dict[str, Any]:
    return {
        "model": record.model,
        "revision": record.revision,
        "policy": record.doc,
        "shares": parse_policy(record.doc).policy(salt=record.model).shares(),
    }


def _with_etag(content: dict[str, Any], revision: int) -> Response:
    response = json_response(content)
    response.headers["ETag"] = f'"{revision}"'
    return response


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    return integer("If-Match", raw.strip().removeprefix("W/").strip('"'), _MAX_REVISION)


async def _change(request: Request, field: str) -> tuple[Any, str]:
    """The ``field`` and the ``reason`` of a ``{field: ..., "reason": ...}`` body."""
    body = await read_json_object(request, _ADMIN_BODY_LIMIT)
    reason = _reason(body)
    unknown = sorted(set(body) - {field, "reason"})
    if unknown:
        raise BadRequest(
            f"{cut(', '.join(unknown))}: unknown field (expected '{field}' and 'reason')"
        )
    if field not in body:
        raise BadRequest(f"{field}: required")
    return body[field], reason


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
    if route.doc.fixed_shares and len(weighted) > 1 and total > 0:
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
