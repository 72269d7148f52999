"""Admin API of rollout templates and approvals (docs/rollouts.md), and their metrics.

``GET|PUT|DELETE /admin/routes/{model}/rollout`` read and change a model's template, audited in
the model's trail as route writes are (who: the token's name; why: the body's ``reason``), PUT
and DELETE with If-Match on the template's revision (its ETag). ``POST .../actions/approve`` and
``.../actions/reject`` record a person's decision on what a rollout awaits; the engine
(gateway.background.rollout) acts on it at its next tick.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from gateway.background.rollout import RolloutEngine
from gateway.errors import BadRequest, NotFound, cut
from gateway.http.access import Access
from gateway.http.admin import _change, _if_match, _reason, _with_etag
from gateway.http.responses import json_response, read_json_object
from gateway.serving.registry import Registry
from router.policy.guard_spec import MONITORED
from router.policy.policies import PolicyError
from router.policy.rollout_spec import PHASES, RolloutTemplate

_BODY_LIMIT = 64 << 10  # a template is a few hundred bytes; its largest field is 2 KiB
MAX_REASON_CHARS = 2000


class RolloutAdmin:
    def __init__(
        self, access: Access, registry: Registry, engine: RolloutEngine, *, monitors: bool = True
    ) -> None:
        self.access = access
        self.registry = registry
        self.engine = engine
        self.monitors = monitors

    async def get(self, request: Request) -> Response:
        self.access.require(request)
        model = self._model(request)
        await self.engine.read()
        template = self.engine.templates.get(model)
        rollout = self.engine.rollouts.get(model)
        if template is None and rollout is None:
            raise NotFound(f"model {cut(model)!r} has no rollout template and no rollout")
        revision = template[0] if template is not None else 0
        content = {
            "model": model,
            "revision": revision,
            "template": template[1].as_json() if template is not None else None,
            "rollout": rollout[1].as_json() if rollout is not None else None,
        }
        return _with_etag(content, revision)

    async def put(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        raw, reason = await _change(request, "rollout")
        try:
            template = RolloutTemplate.parse(raw)
        except PolicyError as exc:
            field = exc.field if exc.field.startswith("rollout") else f"rollout.{exc.field}"
            raise PolicyError(field, exc.message) from None
        thresholds = template.guards.thresholds() if template.guards is not None else {}
        blind = [c for c in MONITORED if c in thresholds] if not self.monitors else []
        if blind:  # its verdict would never be pass: every rollout would stop at its first step
            raise BadRequest(
                f"rollout.guards.{blind[0]}: needs the inline monitors, which are off on this "
                "gateway (TURNOUT_MONITORS=false)"
            )
        revision = await self.engine.store.put_rollout(
            model, template.as_json(), expected=_if_match(request), who=who,
            action="rollout_put", reason=reason,
        )  # fmt: skip
        content = {"model": model, "revision": revision, "template": template.as_json()}
        return _with_etag(content, revision)

    async def delete(self, request: Request) -> Response:
        """Later versions start no rollout; a running one ends under the template it began
        with (its state holds a copy)."""
        who = self.access.require(request)
        model = self._model(request)
        reason = _reason(await read_json_object(request, _BODY_LIMIT))
        expected = _if_match(request)
        if expected is None:
            found = (await self.engine.store.rollouts()).get(model)
            if found is None:
                raise NotFound(f"model {cut(model)!r} has no rollout template")
            expected = found[0]
        await self.engine.store.put_rollout(
            model, None, expected=expected, who=who, action="rollout_delete", reason=reason
        )
        return json_response({"model": model, "deleted": True})

    async def approve(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        body = await read_json_object(request, _BODY_LIMIT)
        reason = _optional_reason(body) or "approved"
        rollout = await self.engine.decide(model, "approved", who, reason)
        return json_response({"model": model, "rollout": rollout.as_json()})

    async def reject(self, request: Request) -> Response:
        who = self.access.require(request)
        model = self._model(request)
        reason = _optional_reason(await read_json_object(request, _BODY_LIMIT))
        if reason is None:
            raise BadRequest("reason: required to reject, a non-empty string saying why")
        rollout = await self.engine.decide(model, "rejected", who, reason)
        return json_response({"model": model, "rollout": rollout.as_json()})

    def _model(self, request: Request) -> str:
        model: str = request.path_params["model"]
        if not self.registry.known(model):
            raise NotFound(f"unknown model {cut(model)!r}")
        return model


def _optional_reason(body: dict[str, Any]) -> str | None:
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise BadRequest(f"{cut(', '.join(unknown))}: unknown field (expected 'reason')")
    if "reason" not in body:
        return None
    return _reason(body)


class RolloutCollector(Collector):
    """The rollouts as this replica last read them from the store (every replica reads them
    each tick, leader or not): one series per model of the registry, never per client value."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        known = self.engine.registry.known
        state = GaugeMetricFamily(
            "turnout_rollout_state",
            "1 for the phase of each model's latest rollout, 0 for the others",
            labels=["model", "state"],
        )
        weight = GaugeMetricFamily(
            "turnout_rollout_weight",
            "Share of traffic the rollout's candidate takes (0 in shadow, 1 once promoted)",
            labels=["model", "version"],
        )
        pending = GaugeMetricFamily(
            "turnout_rollout_approvals_pending",
            "1 while the model's rollout waits for a person's approval",
            labels=["model"],
        )
        for model, (_, rollout) in sorted(self.engine.rollouts.items()):
            if not known(model):
                continue
            for phase in PHASES:
                state.add_metric([model, phase], 1.0 if rollout.phase == phase else 0.0)
            weight.add_metric([model, rollout.version], rollout.weight)
            waiting = rollout.phase == "awaiting_approval" and rollout.decision is None
            pending.add_metric([model], 1.0 if waiting else 0.0)
        failures = CounterMetricFamily(
            "turnout_rollout_confirm_failures",
            "Confirm-webhook calls that did not answer 2xx (each holds the promotion a tick)",
            labels=["model"],
        )
        for model, count in sorted(self.engine.confirm_failures.items()):
            failures.add_metric([model], count)
        leader = GaugeMetricFamily(
            "turnout_rollout_leader", "1 while this replica holds the rollout lease and drives"
        )
        leader.add_metric([], 1.0 if self.engine.leader else 0.0)
        yield from (state, weight, pending, failures, leader)
