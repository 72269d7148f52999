"""Rollout guards in the gateway: a background task keeps windows of the live counters, judges
every policy that carries ``guards`` (router.policy.guards) and applies the change a verdict leads
to through ``RouteTable.write``, as an ordinary audited policy change with a new revision.

One evaluator acts across a fleet: each tick a replica takes or renews the store's lease, and
only its holder evaluates and acts (with the memory store, the process is its own fleet). The
holder judges the traffic it serves itself: every replica counts its own requests, and guards
do not merge the fleet's counters. Every write carries If-Match with the revision judged, so
even two evaluators could not both change the same revision.

Windows are deltas of cumulative counters between periodic snapshots: requests and 5xx from
``Traffic``, latency from each version's monitor, comparisons from the shadow runner. A window
never reaches back before the policy's current revision was first seen here, so each canary
step is judged on its own traffic. Drift comes from the monitors' own window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.background.quality import Quality
from gateway.background.shadow import ShadowRunner
from gateway.background.tasks import holder_id, stop_task
from gateway.errors import GatewayError, NotFound
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic, judged
from gateway.serving.types import Emit, emit_nothing
from monitors import LatencyHistogram
from router.policy.guard_spec import CONDITIONS, QUALITY_CONDITIONS, GuardSpec
from router.policy.guards import (
    ColumnPsi,
    Evaluation,
    Figures,
    Plan,
    QualityWindow,
    ShadowWindow,
    VersionWindow,
    evaluate,
    plan,
)
from router.policy.policies import PolicyError
from router.policy.spec import parse_policy
from router.state.store import StaleRevision, StoreUnavailable
from router.state.table import Route, RouteTable

log = logging.getLogger("turnout.guards")

LEASE_NAME = "guards"  # a dead leader is replaced within the lease's TTL (Settings.lease_ttl_s)
HISTORY_POINTS = 120  # snapshots kept per longest window: its resolution is window_s / 120
AUDIT_LOOKBACK = 100  # entries searched for the last guard action
GUARD_NAMES = frozenset((*CONDITIONS, *QUALITY_CONDITIONS))


@dataclass(frozen=True, slots=True)
class _Counters:
    """One version's cumulative counters at a snapshot."""

    requests: int
    errors: int
    monitor: int  # id of the version's monitor: a reload starts new latency counts
    latency: LatencyHistogram | None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at: float
    versions: dict[tuple[str, str], _Counters]
    shadows: dict[tuple[str, str], ShadowWindow]  # (model, shadow version): cumulative


@dataclass(slots=True)
class _ModelState:
    revision: int
    since: float  # when this replica first saw the revision
    next_at: float
    healthy_since: float | None = None
    verdict: str | None = None
    # the quality windows last read (fleet-wide, every interval_s on every replica, so that
    # ``verdict`` has them whoever leads) and when to read them next
    quality: Mapping[str, QualityWindow] = field(default_factory=dict)
    quality_at: float = 0.0


@dataclass(slots=True)
class _Judgement:
    evaluation: Evaluation
    figures: Figures
    covered_s: float


class GuardEvaluator:
    def __init__(
        self,
        table: RouteTable,
        registry: Registry,
        shadows: ShadowRunner,
        traffic: Traffic,
        metrics: GuardMetrics,
        *,
        tick_s: float = 0.5,
        lease_ttl_s: float = 3.0,
        emit: Emit = emit_nothing,
        quality: Quality | None = None,
    ) -> None:
        """``emit``: where ``guard.breached`` (a verdict turning to breach) and ``guard.acted``
        (a change applied) go; only the lease holder evaluates, so each is emitted once per
        fleet. The change itself is a ``policy.changed`` of the route table's."""
        self.table = table
        self.emit = emit
        # the quality figures the quality guards judge; None: no quality guard ever has labels
        self.quality = quality
        self.registry = registry
        self.shadows = shadows
        self.traffic = traffic
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.metrics = metrics
        self.holder = holder_id()
        self._history: deque[_Snapshot] = deque()
        self._last: _Snapshot | None = None  # the latest tick's snapshot
        self._states: dict[str, _ModelState] = {}
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="guards")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick(time.monotonic())
            except Exception:  # a bug in one tick must not end the guards for good
                log.exception("guard evaluation failed")
            await asyncio.sleep(self.tick_s)

    # -- one tick -------------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        routes = {m: r for m, r in self.table.routes().items() if r.doc.guards is not None}
        for model in [m for m in self._states if m not in routes]:
            del self._states[model]
            self.metrics.forget(model)
        if not routes:  # nothing to evaluate: hold no lease, keep no history
            self._history.clear()
            self._last = None
            self.metrics.leader = False
            return
        await self._lead()
        current = self._last = self._snapshot(now, routes)
        self._remember(current, routes)
        for model, route in routes.items():
            state = self._state(model, route, now)
            spec = route.doc.guards
            assert spec is not None
            if spec.judges_quality and now >= state.quality_at:
                state.quality_at = now + spec.interval_s
                state.quality = await self._quality(model, route, spec)
            if not self.metrics.leader or now < state.next_at:
                continue
            state.next_at = now + spec.interval_s
            try:
                await self._evaluate(model, route, spec, state, current, now)
            except Exception:  # one model's failure must not stop the others' guards
                log.exception("guards of %s: evaluation failed", model)

    async def _lead(self) -> None:
        try:
            leader = await self.table.store.acquire_lease(LEASE_NAME, self.holder, self.lease_ttl_s)
        except StoreUnavailable as exc:
            if self.metrics.leader:
                log.warning("guard lease not renewed, standing down: %s", exc)
            leader = False
        if leader != self.metrics.leader:
            log.info("guards: %s", "evaluating (lease held)" if leader else "standing by")
            for model, state in self._states.items():
                state.healthy_since = None
                self.metrics.forget(model)
        self.metrics.leader = leader

    def _state(self, model: str, route: Route, now: float) -> _ModelState:
        state = self._states.get(model)
        if state is None or state.revision != route.revision:
            state = self._states[model] = _ModelState(route.revision, now, now)
            self.metrics.forget(model)
        return state

    async def _evaluate(
        self,
        model: str,
        route: Route,
        spec: GuardSpec,
        state: _ModelState,
        current: _Snapshot,
        now: float,
    ) -> None:
        judged = self._judge(model, route, spec, current, now, state.quality)
        evaluation = judged.evaluation
        self._export(model, route, spec, judged)
        if self.quality is not None and spec.judges_quality:
            self.quality.judged(model, evaluation)
        if evaluation.verdict == "pass":
            state.healthy_since = now if state.healthy_since is None else state.healthy_since
        else:
            state.healthy_since = None
        breached = evaluation.verdict == "breach" and state.verdict != "breach"
        if evaluation.verdict != state.verdict:
            level = logging.WARNING if evaluation.verdict == "breach" else logging.INFO
            log.log(level, "guards of %s rev %d: %s", model, route.revision, evaluation.verdict)
            state.verdict = evaluation.verdict
        healthy_for = 0.0 if state.healthy_since is None else now - state.healthy_since
        by_guard = False
        if evaluation.verdict == "breach":
            by_guard = await self._last_change_by_guard(model)
        change = plan(
            route.doc, spec, evaluation, healthy_for_s=healthy_for, last_change_by_guard=by_guard
        )
        if breached:
            first = evaluation.breaches[0]
            self.emit(
                "guard.breached",
                model,
                {
                    "condition": first.guard,
                    "version": first.version,
                    "value": first.value,
                    "threshold": first.threshold,
                    "action": change.action if change is not None else None,
                    "who": f"guard:{change.guard if change is not None else first.guard}",
                    "revision": route.revision,
                    "breaches": [c.as_json() for c in evaluation.breaches],
                },
            )
        if change is not None:
            await self._apply(model, route, spec, judged, change)

    async def _apply(
        self, model: str, route: Route, spec: GuardSpec, judged: _Judgement, change: Plan
    ) -> None:
        try:
            doc = parse_policy(change.doc.as_json(), self.registry.ready_versions(model))
            artifacts = self.registry.artifacts(model, doc.versions())
        except (PolicyError, GatewayError) as exc:
            log.error("guards of %s: %s would leave an invalid policy: %s", model, change, exc)
            return
        details = {"guards": spec.as_doc(), **self._describe(judged, route, spec)}
        try:
            record = await self.table.write(
                model, doc, expected=route.revision, who=f"guard:{change.guard}",
                action=change.action, reason=change.reason, artifacts=artifacts, details=details,
            )  # fmt: skip
        except (StaleRevision, StoreUnavailable) as exc:  # changed meanwhile, or store down
            log.warning(
                "guards of %s: %s not applied (next tick retries): %s", model, change.action, exc
            )
            return
        self.metrics.actions[(model, change.action)] += 1
        revision = record.revision if record is not None else None
        breach = next((c for c in judged.evaluation.breaches if c.guard == change.guard), None)
        self.emit(
            "guard.acted",
            model,
            {
                "condition": change.guard,
                "version": breach.version if breach is not None else None,
                "action": change.action,
                "who": f"guard:{change.guard}",
                "reason": change.reason,
                "revision": revision,
                "from_revision": route.revision,
            },
        )
        log.warning(
            "guards of %s: %s (revision %d -> %s): %s",
            model, change.action, route.revision, revision, change.reason,
        )  # fmt: skip

    async def _last_change_by_guard(self, model: str) -> bool:
        try:
            entries = await self.table.store.audit(model, 1)
        except StoreUnavailable:
            return True  # unsure: do not switch
        return bool(entries) and entries[0].who.startswith("guard:")

    # -- windows --------------------------------------------------------------------------------
    def _snapshot(self, now: float, routes: Mapping[str, Route]) -> _Snapshot:
        requests: dict[tuple[str, str], list[int]] = {}
        for (model, version, role, code), n in self.traffic.requests.items():
            if model in routes and version and judged(role, code):
                cell = requests.setdefault((model, version), [0, 0])
                cell[0] += n
                cell[1] += n if code[0] == "5" else 0
        for key, n in self.traffic.client_timeouts.items():
            chosen = requests.get(key)
            if chosen is not None:  # 504s the client chose: not the version's fault
                chosen[0] -= n
                chosen[1] -= n
        versions: dict[tuple[str, str], _Counters] = {}
        for model, route in routes.items():
            for version in route.doc.primary_versions():
                total, errors = requests.get((model, version), (0, 0))
                try:
                    monitor = self.registry.get(model, version).monitor
                except GatewayError:  # not loaded here (yet): requests only
                    versions[(model, version)] = _Counters(total, errors, 0, None)
                    continue
                latency = monitor.cumulative_latency()["total"]
                versions[(model, version)] = _Counters(total, errors, id(monitor), latency)
        shadows: dict[tuple[str, str], ShadowWindow] = {}
        for (model, _primary, shadow), d in self.shadows.divergence.items():
            if model in routes:
                seen = shadows.get((model, shadow), ShadowWindow())
                shadows[(model, shadow)] = ShadowWindow(
                    seen.compared + d.requests,
                    seen.rows + d.rows,
                    seen.disagreements + d.disagreements,
                )
        return _Snapshot(now, versions, shadows)

    def _remember(self, snapshot: _Snapshot, routes: Mapping[str, Route]) -> None:
        longest = max(r.doc.guards.window_s for r in routes.values() if r.doc.guards)
        resolution = max(self.tick_s, longest / HISTORY_POINTS)
        if not self._history or snapshot.at - self._history[-1].at >= resolution:
            self._history.append(snapshot)
        while self._history and self._history[0].at < snapshot.at - longest - resolution:
            self._history.popleft()

    def _base(self, start: float, current: _Snapshot) -> _Snapshot:
        """The oldest snapshot taken at or after ``start`` (the current one if none)."""
        return next((s for s in self._history if s.at >= start), current)

    async def _quality(
        self, model: str, route: Route, spec: GuardSpec
    ) -> Mapping[str, QualityWindow]:
        if self.quality is None or not spec.judges_quality:
            return {}
        return await self.quality.guard_windows(model, route.doc, spec)

    def _judge(
        self,
        model: str,
        route: Route,
        spec: GuardSpec,
        current: _Snapshot,
        now: float,
        quality: Mapping[str, QualityWindow] | None = None,
    ) -> _Judgement:
        state = self._states.get(model)
        since = state.since if state is not None and state.revision == route.revision else now
        base = self._base(max(now - spec.window_s, since), current)
        drift = spec.max_psi is not None or spec.max_prediction_psi is not None
        tested = {s.version for s in route.doc.subjects()}
        versions: dict[str, VersionWindow] = {}
        for version in route.doc.primary_versions():
            cur = current.versions.get((model, version))
            if cur is None:
                continue
            old = base.versions.get((model, version), cur)
            features, outputs = (
                self._drift(model, version, now) if drift and version in tested else ((), ())
            )
            versions[version] = VersionWindow(
                requests=cur.requests - old.requests,
                errors=cur.errors - old.errors,
                latency=_latency_delta(cur, old),
                features=features,
                outputs=outputs,
            )
        shadows: dict[str, ShadowWindow] = {}
        for version in route.doc.shadow_versions():
            cur_s = current.shadows.get((model, version), ShadowWindow())
            old_s = base.shadows.get((model, version), cur_s)
            shadows[version] = ShadowWindow(
                cur_s.compared - old_s.compared,
                cur_s.rows - old_s.rows,
                cur_s.disagreements - old_s.disagreements,
            )
        figures = Figures(versions, shadows, quality or {})
        return _Judgement(evaluate(spec, route.doc, figures), figures, current.at - base.at)

    def _drift(
        self, model: str, version: str, now: float
    ) -> tuple[tuple[ColumnPsi, ...], tuple[ColumnPsi, ...]]:
        try:
            snapshot = self.registry.get(model, version).monitor.snapshot(now)
        except GatewayError:
            return (), ()

        def columns(key: str) -> tuple[ColumnPsi, ...]:
            return tuple(
                ColumnPsi(
                    c["name"],
                    c["psi"],
                    math.inf if c["critical_psi"] is None else c["critical_psi"],
                    c["status"] != "insufficient",
                )
                for c in snapshot[key]
            )

        return columns("features"), columns("outputs")

    # -- reporting ------------------------------------------------------------------------------
    def _export(self, model: str, route: Route, spec: GuardSpec, judged: _Judgement) -> None:
        self.metrics.evaluations[(model, judged.evaluation.verdict)] += 1
        self.metrics.forget(model)
        for guard, threshold in spec.thresholds().items():
            self.metrics.thresholds[(model, guard)] = threshold
        for check in judged.evaluation.checks:
            if check.value is not None and check.guard.partition(".")[0] in GUARD_NAMES:
                self.metrics.values[(model, check.version, check.guard)] = check.value
        for subject in route.doc.subjects():
            window = judged.figures.versions.get(subject.version, VersionWindow())
            self.metrics.requests[(model, subject.version)] = window.requests

    def _describe(self, judged: _Judgement, route: Route, spec: GuardSpec) -> dict[str, Any]:
        """The evidence, JSON-ready: verdict, checks, window and per-version figures."""
        versions = {}
        for version, w in judged.figures.versions.items():
            p99 = w.latency.quantile(0.99) if w.latency is not None and w.latency.count else None
            versions[version] = {
                "requests": w.requests,
                "errors": w.errors,
                "error_ratio": w.errors / w.requests if w.requests else None,
                "p99_s": p99,
            }
        shadows = {
            v: {
                **dataclasses.asdict(s),
                "disagreement_ratio": s.disagreements / s.rows if s.rows else None,
            }
            for v, s in judged.figures.shadows.items()
        }
        out = {
            "revision": route.revision,
            **judged.evaluation.as_json(),
            "window": {"window_s": spec.window_s, "covered_s": judged.covered_s},
            "versions": versions,
            "shadows": shadows,
        }
        if spec.judges_quality:
            out["quality"] = {
                v: {
                    "labels": q.labels,
                    "figures": {m: dataclasses.asdict(f) for m, f in q.figures.items()},
                    "drops": dict(q.drops),
                    "baseline_labels": q.baseline_labels,
                }
                for v, q in judged.figures.quality.items()
            }
        return out

    def verdict(self, model: str) -> str | None:
        """The guards' verdict on the model's current policy, judged on this replica's windows
        as of its latest tick, whether or not it holds the lease (the rollout engine asks before
        each step). None when the policy has no guards or was not seen by a tick yet."""
        route = self.table.get(model)
        current, state = self._last, self._states.get(model)
        if route is None or route.doc.guards is None or current is None:
            return None
        if state is None or state.revision != route.revision:
            return None
        judged = self._judge(model, route, route.doc.guards, current, current.at, state.quality)
        return judged.evaluation.verdict

    async def view(self, model: str) -> dict[str, Any]:
        """The verdict on this replica's current windows, the figures and thresholds behind it,
        and the last action any guard took on the model (GET /admin/routes/{model}/guards)."""
        route = self.table.get(model)
        if route is None:
            raise NotFound(f"model {model!r} has no routing policy")
        spec = route.doc.guards
        if spec is None:
            raise NotFound(f"the policy of {model!r} has no guards")
        now = time.monotonic()
        quality = await self._quality(model, route, spec)
        snapshot = self._snapshot(now, {model: route})
        judged = self._judge(model, route, spec, snapshot, now, quality)
        entries = await self.table.store.audit(model, AUDIT_LOOKBACK)
        last = next((e for e in entries if e.who.startswith("guard:")), None)
        state = self._states.get(model)
        healthy_for = None
        if state is not None and state.healthy_since is not None and self.metrics.leader:
            healthy_for = now - state.healthy_since
        return {
            "model": model,
            "strategy": route.strategy,
            "guards": spec.as_doc(),
            "thresholds": spec.thresholds(),
            "leader": self.metrics.leader,
            "healthy_for_s": healthy_for,
            **self._describe(judged, route, spec),
            "last_action": dataclasses.asdict(last) if last is not None else None,
        }


def _latency_delta(cur: _Counters, old: _Counters) -> LatencyHistogram | None:
    """The window's latency histogram; counts since load when the version was reloaded."""
    if cur.latency is None:
        return None
    if old.latency is None or old.monitor != cur.monitor:
        return cur.latency
    counts = cur.latency.counts - old.latency.counts
    if (counts < 0).any():
        return cur.latency
    # min and max cannot be subtracted; the cumulative ones only clamp quantiles more loosely
    stats = np.array([cur.latency.sum - old.latency.sum, cur.latency.min, cur.latency.max])
    return LatencyHistogram(counts, stats)
