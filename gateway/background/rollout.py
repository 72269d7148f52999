"""Rollouts that start by themselves: when a model with a rollout template (router.policy.
rollout_spec) has a READY version newer than the one its policy serves, the engine shadows it,
walks it through the template's canary steps while the guards pass, holds it for approval or an
external check where the template asks, and promotes it. docs/rollouts.md is the operator's
guide; this docstring is the engineer's.

One engine drives a fleet: each tick a replica reads every template and rollout state from the
store, takes or renews the ``rollouts`` lease, and only the holder acts. Everything it needs
lives in the store (templates, the rollout's state with the times of its phase, the revision it
last wrote), so a replica that takes the lease over, or a restarted one, continues where the
last holder stopped. Times are wall-clock seconds (``tick(now)``; tests pass their own clock).

Every policy change goes through ``RouteTable.write`` with If-Match on the revision the rollout
last wrote, audited with ``who = "rollout:<template revision>"`` and a reason naming the step.
A policy found at any other revision was changed by someone else: by a guard (the audit entry's
``who`` starts with ``guard:``) the rollout ends ``rolled_back``, by anyone else ``aborted``;
either way the engine writes nothing more for it.

The level is what triggers, not the load event: a rollout starts for the highest READY version
above the serving one that was not rolled out before (``Rollout.tried`` keeps ``version@sha256``),
however it got loaded (the repository API, start-up) and whichever replica loaded it. A newer
version loaded during a rollout waits (queued, not superseding): when the running rollout ends,
the highest untried version above the one then serving starts. With a shared store it
starts once every live replica serves the candidate's artifact READY (``CountsExchange.
lacking``): the repository API is per replica, and a canary would send requests to a replica
that has not loaded the version yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import httpx

from gateway.background.fleet import CountsExchange
from gateway.background.guards import GuardEvaluator
from gateway.background.tasks import holder_id, stop_task
from gateway.errors import Conflict, GatewayError
from gateway.serving.registry import Registry
from gateway.serving.repository import version_key
from gateway.serving.types import Emit, emit_nothing
from router.policy.policies import PolicyError
from router.policy.rollout_spec import (
    Decision,
    Gate,
    Phase,
    Rollout,
    RolloutTemplate,
    remember,
    tried_key,
)
from router.policy.spec import CanaryDoc, PolicyDoc, SingleDoc, parse_policy
from router.state.store import (
    AuditEntry,
    AuditNote,
    RolloutCopy,
    RouteRecord,
    StaleRevision,
    StoreUnavailable,
)
from router.state.table import RouteTable

log = logging.getLogger("turnout.rollout")

LEASE_NAME = "rollouts"
CONFIRM_TIMEOUT_S = 5.0  # the confirm webhook's whole exchange, connect included
AUDIT_LOOKBACK = 50  # entries searched for the change that ended a rollout


class RolloutEngine:
    def __init__(
        self,
        table: RouteTable,
        registry: Registry,
        guards: GuardEvaluator | None = None,
        *,
        emit: Emit = emit_nothing,
        fleet: CountsExchange | None = None,
        tick_s: float = 0.5,
        lease_ttl_s: float = 3.0,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        self.table = table
        self.store = table.store
        self.registry = registry
        self.guards = guards
        self.emit = emit
        # what the other replicas serve: a candidate starts once every one serves it
        self.fleet = fleet
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.confirm_timeout_s = confirm_timeout_s
        self.holder = holder_id()
        self.leader = False
        # As read from the store by the latest tick (every replica reads; only the leader acts).
        self.templates: dict[str, tuple[int, RolloutTemplate]] = {}
        self.rollouts: dict[str, tuple[int, Rollout]] = {}
        self._stored: dict[str, tuple[int, dict[str, Any]]] = {}  # the templates as read
        self._store_behind = False  # logged once a reset, not once a tick
        table.held_rollouts = self.held  # what a restore of the store puts back
        self.confirm_failures: Counter[str] = Counter()  # model -> non-2xx or failed calls
        self._not_started: dict[str, int] = {}  # model -> a canary revision not a rollout's
        self._waiting: dict[str, str] = {}  # model -> the candidate logged as waiting
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def stop(self) -> None:
        await stop_task(self._task)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _run(self) -> None:
        store_down = False  # logged once an outage, not once a tick
        while True:
            try:
                await self.tick(time.time())
                if store_down:
                    log.info("rollouts: state store back")
                store_down = False
            except StoreUnavailable as exc:
                if not store_down:
                    log.warning("rollouts: state store unavailable, ticks retry: %s", exc)
                store_down = True
            except Exception:  # a bug in one tick must not end the rollouts for good
                log.exception("rollout tick failed")
            await asyncio.sleep(self.tick_s)

    # -- one tick -------------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        try:
            current = await self.read()
        except StoreUnavailable:
            self.leader = False  # the lease cannot be renewed either: stand down
            raise
        if not current:  # nothing to act on until the store holds the rollouts again
            self.leader = False
            return
        models = {m for m in self.templates} | {
            m for m, (_, r) in self.rollouts.items() if r.active
        }
        models = {m for m in models if self.registry.known(m)}  # names from the repository only
        if not models:  # nothing to drive: hold no lease
            self.leader = False
            return
        await self._lead()
        if not self.leader:
            return
        _, records = await self.store.routes()
        for model in sorted(models, key=str):
            try:
                await self._drive(model, records.get(model), now)
            except (StaleRevision, StoreUnavailable) as exc:  # changed meanwhile, or store down
                log.warning("rollout of %s: not applied (next tick retries): %s", model, exc)
            except Exception:  # one model's failure must not stop the others' rollouts
                log.exception("rollout of %s failed", model)

    async def read(self) -> bool:
        """Templates and rollout states as the store has them now; False, keeping the copy read
        before, when the store is behind the route table (it lost its state: the table puts
        this copy back with its policies, RouteTable.refresh)."""
        # both at once: one round trip's wait, not two, each tick on every replica
        stored, states = await asyncio.gather(self.store.rollouts(), self.store.rollout_states())
        # Read after them: a store emptied before they were read is behind by now, unless it
        # was restored meanwhile, and then from this copy, the one still held.
        behind = await self.store.revision() < self.table.revision
        if behind != self._store_behind:
            if behind:
                log.warning("rollouts: the state store lost its state; held until restored")
            else:
                log.info("rollouts: the state store is restored")
            self._store_behind = behind
        if behind:
            return False
        templates: dict[str, tuple[int, RolloutTemplate]] = {}
        for model, (revision, raw) in stored.items():
            try:
                templates[model] = (revision, RolloutTemplate.parse(raw))
            except PolicyError as exc:  # valid when written: a newer version's field, say
                log.error("rollout template of %s unreadable: %s", model, exc)
        rollouts: dict[str, tuple[int, Rollout]] = {}
        for model, (seq, raw) in states.items():
            try:
                rollouts[model] = (seq, Rollout.from_json(raw))
            except (TypeError, KeyError) as exc:
                log.error("rollout state of %s unreadable: %s", model, exc)
        self.templates, self.rollouts, self._stored = templates, rollouts, stored
        return True

    def held(self) -> RolloutCopy:
        """The templates as last read and the rollout states as last read or saved here."""
        states = {model: (seq, r.as_json()) for model, (seq, r) in self.rollouts.items()}
        return RolloutCopy(dict(self._stored), states)

    async def _lead(self) -> None:
        try:
            leader = await self.store.acquire_lease(LEASE_NAME, self.holder, self.lease_ttl_s)
        except StoreUnavailable as exc:
            if self.leader:
                log.warning("rollout lease not renewed, standing down: %s", exc)
            leader = False
        if leader != self.leader:
            log.info("rollouts: %s", "driving (lease held)" if leader else "standing by")
        self.leader = leader

    async def _drive(self, model: str, record: RouteRecord | None, now: float) -> None:
        found = self.rollouts.get(model)
        if found is not None and found[1].active:
            seq, rollout = found
            try:
                await self._step(seq, rollout, record, now)
            except (PolicyError, GatewayError) as exc:  # the candidate or baseline went away
                why = f"cannot continue: {exc}"
                try:  # back to the baseline while it is there
                    await self._rollback(seq, rollout, why, now)
                except (PolicyError, GatewayError):
                    await self._end(seq, rollout, "aborted", why, now)
        elif model in self.templates:
            await self._maybe_start(model, found, record, now)

    # -- starting -------------------------------------------------------------------------------
    async def _maybe_start(
        self,
        model: str,
        found: tuple[int, Rollout] | None,
        record: RouteRecord | None,
        now: float,
    ) -> None:
        revision, spec = self.templates[model]
        ready = self.registry.ready_versions(model)
        if not ready:
            return
        who = f"rollout:{revision}"
        if record is None:  # pin what the default route serves, so no new version takes it
            why = f"pin version {ready[-1]}, served by default, under the rollout template"
            await self._write(model, SingleDoc(version=ready[-1]), 0, who, "pin", why)
            return
        current = parse_policy(record.doc)
        if isinstance(current, CanaryDoc):  # the start of a rollout whose state was not saved?
            await self._adopt_start(model, found, record, current, now)
            return
        if not isinstance(current, SingleDoc):
            return  # a person's experiment is running: a rollout starts from single
        serving = current.version
        tried = found[1].tried if found is not None else ()
        untried = [
            v
            for v in ready
            if version_key(v) > version_key(serving)
            and tried_key(v, self.registry.get(model, v).info.sha256) not in tried
        ]
        if not untried:
            return
        candidate = max(untried, key=version_key)
        sha256 = self.registry.get(model, candidate).info.sha256
        lacking = await self.fleet.lacking(model, candidate, sha256) if self.fleet else 0
        if lacking:  # a replica without it would fail the requests a canary sends it
            if self._waiting.get(model) != f"{candidate}@{sha256}":
                self._waiting[model] = f"{candidate}@{sha256}"
                log.info(
                    "rollout of %s version %s waits: not READY on %d other replica(s)",
                    model, candidate, lacking,
                )  # fmt: skip
            return
        if spec.shadow_s > 0:
            doc: PolicyDoc = spec.shadow(serving, candidate, current.seed)
            phase: Phase = "shadow"
            step = -1
            why = f"version {candidate} ready: shadow for {spec.shadow_s:g} s"
        else:
            doc = spec.canary(serving, candidate, 0, current.seed)
            phase, step = "canary", 0
            why = f"version {candidate} ready: {_step_name(spec, 0)}"
        written = await self._write(model, doc, record.revision, who, "rollout_start", why)
        rollout = Rollout(
            model=model, version=candidate, sha256=sha256, baseline=serving,
            template=spec.as_json(), template_revision=revision, phase=phase, step=step,
            started_at=now, since=now, route_revision=written, why=why,
            tried=remember(tried, tried_key(candidate, sha256)),
        )  # fmt: skip
        await self._save(found[0] if found is not None else 0, rollout)
        self._event("rollout.started", rollout)

    async def _adopt_start(
        self,
        model: str,
        found: tuple[int, Rollout] | None,
        record: RouteRecord,
        doc: CanaryDoc,
        now: float,
    ) -> None:
        """A canary this engine wrote as a rollout's start, the state of which was never saved
        (the store failed after the policy write): take it up. A person's canary is left alone."""
        if found is not None and found[1].route_revision == record.revision:
            return  # the canary an ended rollout left in place (its versions went away)
        if self._not_started.get(model) == record.revision:
            return  # this revision's audit entry was read before: not a rollout's start
        revision, spec = self.templates[model]
        entry = await self._change_of(model, record)
        if entry is None or entry.who != f"rollout:{revision}" or entry.action != "rollout_start":
            self._not_started[model] = record.revision
            return
        sha256 = self.registry.get(model, doc.candidate).info.sha256
        tried = found[1].tried if found is not None else ()
        rollout = Rollout(
            model=model, version=doc.candidate, sha256=sha256, baseline=doc.baseline,
            template=spec.as_json(), template_revision=revision, phase="canary", step=0,
            started_at=now, since=now, route_revision=record.revision, why=entry.reason,
            tried=remember(tried, tried_key(doc.candidate, sha256)),
        )  # fmt: skip
        await self._save(found[0] if found is not None else 0, rollout)
        log.warning("rollout of %s: took up its unsaved start (%s)", model, entry.reason)
        self._event("rollout.started", rollout)

    # -- a running rollout ------------------------------------------------------------------------
    async def _step(
        self, seq: int, rollout: Rollout, record: RouteRecord | None, now: float
    ) -> None:
        if record is None or record.revision != rollout.route_revision:
            await self._changed_by_someone(seq, rollout, record, now)
            return
        spec = rollout.spec
        if rollout.phase == "awaiting_approval":
            if rollout.decision == "rejected":
                why = f"rejected by {rollout.decided_by}: {rollout.decision_reason}"
                await self._rollback(seq, rollout, why, now)
            elif rollout.decision == "approved":
                assert rollout.gate is not None
                await self._go(seq, rollout, spec, rollout.gate, now)
            return
        if rollout.phase == "confirming":
            await self._go(seq, rollout, spec, "promotion", now)
            return
        held = now - rollout.since
        if held < (spec.shadow_s if rollout.phase == "shadow" else spec.step_s):
            return
        if spec.guards is not None:
            verdict = self.guards.verdict(rollout.model) if self.guards is not None else None
            if verdict != "pass":  # too few requests yet (a breach is the guards' to act on)
                return
        last = rollout.step + 1 >= len(spec.steps)
        gate: Gate = "promotion" if last else "step"
        if spec.approval == "required" and (last or spec.approve_each_step):
            target = "promotion" if last else _step_name(spec, rollout.step + 1)
            why = f"awaiting approval before {target}"
            waiting = rollout.moved(
                phase="awaiting_approval", gate=gate, since=now, why=why, decision=None,
                decided_by=None, decision_reason=None,
            )  # fmt: skip
            await self._save(seq, waiting)
            self.emit(
                "approval.requested",
                rollout.model,
                {"version": rollout.version, "who": self._who(rollout), "reason": why},
            )
            return
        await self._go(seq, rollout, spec, gate, now)

    async def _go(
        self, seq: int, rollout: Rollout, spec: RolloutTemplate, gate: Gate, now: float
    ) -> None:
        """Take the next step, or promote (after the confirm webhook's 2xx when configured)."""
        if gate == "step":
            step = rollout.step + 1
            canary = spec.canary(rollout.baseline, rollout.version, step, None)
            why = f"{_step_name(spec, step)} after {now - rollout.since:.0f} s"
            if rollout.decision == "approved":
                why += f" (approved by {rollout.decided_by})"
            written = await self._write(
                rollout.model, canary, rollout.route_revision, self._who(rollout), "advance", why
            )
            moved = rollout.moved(
                phase="canary", step=step, since=now, route_revision=written, why=why, gate=None,
                decision=None, decided_by=None, decision_reason=None,
            )  # fmt: skip
            await self._save(seq, moved)
            self._event("rollout.advanced", moved)
            return
        if spec.confirm_url is not None:
            if rollout.phase != "confirming":
                confirming = rollout.moved(
                    phase="confirming", gate="promotion", since=now,
                    why=f"awaiting a 2xx from the confirm webhook {spec.confirm_url}",
                )  # fmt: skip
                seq = await self._save(seq, confirming)
                rollout = confirming
            if not await self._confirm(rollout, spec.confirm_url):
                return
        why = f"promoted after {_step_name(spec, len(spec.steps) - 1)}"
        if rollout.decided_by is not None:
            why += f" (approved by {rollout.decided_by})"
        if spec.confirm_url is not None:
            why += "; confirmed by the webhook"
        doc = SingleDoc(version=rollout.version, guards=spec.guards)
        written = await self._write(
            rollout.model, doc, rollout.route_revision, self._who(rollout), "promote", why
        )
        await self._end(seq, rollout.moved(route_revision=written), "promoted", why, now)

    async def _rollback(self, seq: int, rollout: Rollout, why: str, now: float) -> None:
        spec = rollout.spec
        doc = SingleDoc(version=rollout.baseline, guards=spec.guards)
        written = await self._write(
            rollout.model, doc, rollout.route_revision, self._who(rollout), "rollback", why
        )
        await self._end(seq, rollout.moved(route_revision=written), "rolled_back", why, now)

    async def _changed_by_someone(
        self, seq: int, rollout: Rollout, record: RouteRecord | None, now: float
    ) -> None:
        entry = await self._change_of(rollout.model, record)
        who = entry.who if entry is not None else "unknown"
        what = f"{entry.action}: {entry.reason}" if entry is not None else "policy changed"
        if record is not None and who == self._who(rollout):
            await self._adopt(seq, rollout, record, what, now)
        elif who.startswith("guard:"):
            await self._end(seq, rollout, "rolled_back", f"{who} {what}", now)
        else:
            await self._end(seq, rollout, "aborted", f"policy changed by {who} ({what})", now)

    async def _adopt(
        self, seq: int, rollout: Rollout, record: RouteRecord, what: str, now: float
    ) -> None:
        """The rollout's own policy write whose state was not saved (the store failed between
        the two, or the leader died): take the state up from the policy written."""
        doc = parse_policy(record.doc)
        adopted = rollout.moved(
            route_revision=record.revision, since=now, why=what, decision=None,
            decided_by=None, decision_reason=None,
        )  # fmt: skip
        if isinstance(doc, CanaryDoc) and doc.candidate == rollout.version:
            step = doc.steps.index(doc.weight) if doc.weight in doc.steps else 0
            await self._save(seq, adopted.moved(phase="canary", step=step, gate=None))
        elif isinstance(doc, SingleDoc) and doc.version == rollout.version:
            await self._end(seq, adopted, "promoted", what, now)
        elif isinstance(doc, SingleDoc) and rollout.version in doc.shadow_versions():
            await self._save(seq, adopted.moved(phase="shadow", step=-1, gate=None))
        else:
            await self._end(seq, adopted, "rolled_back", what, now)
        log.warning("rollout of %s: took up its own unsaved change (%s)", rollout.model, what)

    async def _change_of(self, model: str, record: RouteRecord | None) -> AuditEntry | None:
        """The audit entry of the change that replaced the rollout's policy."""
        entries = await self.store.audit(model, AUDIT_LOOKBACK)
        if record is None:
            return next((e for e in entries if e.before is not None and e.after is None), None)
        return next((e for e in entries if e.revision == record.revision), None)

    async def _confirm(self, rollout: Rollout, url: str) -> bool:
        """POST the rollout to the confirm webhook: True on a 2xx. Anything else (another
        status, a redirect, a timeout, a refused connection) holds the promotion; the next tick
        asks again. The answer's body is not read."""
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        body = {"type": "confirm-promotion", "rollout": rollout.as_json()}
        try:
            async with self._http.stream(
                "POST", url, json=body, timeout=self.confirm_timeout_s
            ) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            self._confirm_failed(rollout.model, f"failed: {exc!r}")
            return False
        if 200 <= status < 300:
            return True
        self._confirm_failed(rollout.model, f"answered {status}")
        return False

    def _confirm_failed(self, model: str, what: str) -> None:
        """Count a failed confirm call; log the 1st, 2nd, 4th, 8th... (one a tick would flood)."""
        self.confirm_failures[model] += 1
        n = self.confirm_failures[model]
        if n & (n - 1) == 0:
            log.warning("rollout of %s: confirm webhook %s: holding (failure %d)", model, what, n)

    async def _end(self, seq: int, rollout: Rollout, phase: Phase, why: str, now: float) -> None:
        ended = rollout.moved(phase=phase, ended_at=now, why=why, gate=None)
        await self._save(seq, ended)
        level = logging.INFO if phase == "promoted" else logging.WARNING
        log.log(level, "rollout of %s version %s: %s (%s)", ended.model, ended.version, phase, why)
        self._event(f"rollout.{phase}", ended)

    # -- approval (any replica, from the admin API) ---------------------------------------------
    async def decide(self, model: str, decision: Decision, who: str, reason: str) -> Rollout:
        """Record a person's approval or rejection of what the rollout awaits, with its audit
        entry, in one step; the leader acts on it at its next tick. Conflict (409) when nothing
        awaits approval (or another decision got there first)."""
        found = (await self.store.rollout_states()).get(model)
        rollout = None if found is None else Rollout.from_json(found[1])
        if found is None or rollout is None or rollout.phase != "awaiting_approval":
            now = "no rollout" if rollout is None else f"its rollout is {rollout.phase}"
            raise Conflict(f"nothing of model {model!r} awaits approval ({now})")
        if rollout.decision is not None:
            raise Conflict(
                f"the rollout of {model!r} was already {rollout.decision} by {rollout.decided_by}"
            )
        decided = rollout.moved(decision=decision, decided_by=who, decision_reason=reason)
        action = "approve" if decision == "approved" else "reject"
        details = {"version": rollout.version, "gate": rollout.gate, "step": rollout.step}
        note = AuditNote(who, action, reason, details)
        try:
            await self.store.put_rollout_state(
                model, decided.as_json(), expected=found[0], note=note
            )
        except StaleRevision:
            raise Conflict(f"the rollout of {model!r} changed meanwhile; read it again") from None
        kind = "approval.granted" if decision == "approved" else "approval.rejected"
        self.emit(kind, model, {"version": rollout.version, "who": who, "reason": reason})
        return decided

    # -- helpers --------------------------------------------------------------------------------
    async def _write(
        self, model: str, doc: PolicyDoc, expected: int, who: str, action: str, why: str
    ) -> int:
        checked = parse_policy(doc.as_json(), self.registry.ready_versions(model))
        artifacts = self.registry.artifacts(model, checked.versions())
        record = await self.table.write(
            model, checked, expected=expected, who=who, action=action, reason=why,
            artifacts=artifacts,
        )  # fmt: skip
        assert record is not None
        log.info("rollout of %s: %s (revision %d): %s", model, action, record.revision, why)
        return record.revision

    async def _save(self, seq: int, rollout: Rollout) -> int:
        new = await self.store.put_rollout_state(rollout.model, rollout.as_json(), expected=seq)
        self.rollouts[rollout.model] = (new, rollout)
        return new

    def _event(self, kind: str, rollout: Rollout) -> None:
        data: dict[str, Any] = {
            "version": rollout.version,
            "step": rollout.step,
            "weight": rollout.weight,
            "why": rollout.why,
        }
        self.emit(kind, rollout.model, data)

    @staticmethod
    def _who(rollout: Rollout) -> str:
        return f"rollout:{rollout.template_revision}"


def _step_name(spec: RolloutTemplate, step: int) -> str:
    return f"canary step {step + 1} of {len(spec.steps)} (weight {spec.steps[step]:g})"
