"""The replica's routing table: a local cache of every model's policy, kept in step with the
state store by background tasks, plus the buffers (served counts, rewards) that fold back into
the store in batches and the feedback join (router.state.join).

The request path (``route``, ``served``) reads and writes only local memory; it never waits on
the store. One event loop thread owns the table, so buffers need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.policy.bandit import bandit_of, with_bandit
from router.policy.policies import Decision, Policy, PolicyError, sticky_key
from router.policy.spec import PolicyDoc, parse_policy
from router.state.join import FeedbackJoin
from router.state.store import (
    ArmStats,
    Assignment,
    RolloutCopy,
    RouteRecord,
    StateStore,
    StoreUnavailable,
)

log = logging.getLogger("turnout.router")

# gateway.serving.types.Emit, structurally (the router does not import the gateway).
EmitFn = Callable[[str, str, Mapping[str, Any]], None]


def _emit_nothing(kind: str, subject: str, data: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    revision: int
    doc: PolicyDoc
    policy: Policy

    @property
    def strategy(self) -> str:
        return self.doc.strategy


class UnknownInference(LookupError):
    """Feedback for an id the gateway never served, whose assignment expired or was evicted, or
    that was served under a policy revision since replaced."""


class RewardConflict(Exception):
    """Feedback for an id that already took a different reward: one reward per inference."""

    def __init__(self, request_id: str, taken: float, reward: float) -> None:
        super().__init__(
            f"reward: inference {request_id!r} already took {taken!r}; a different "
            f"reward ({reward!r}) is refused (one reward per inference id)"
        )


class RouteTable:
    def __init__(
        self,
        store: StateStore,
        *,
        shared: bool = True,
        feedback_ttl_s: float = 3600.0,
        flush_s: float = 0.2,
        feedback_max_entries: int = 1_000_000,
        feedback_max_bytes: int = 128 << 20,
        on_change: Callable[[Route | None, str], None] | None = None,
        emit: EmitFn = _emit_nothing,
    ) -> None:
        """``emit``: where each policy change written here goes as a ``policy.changed`` event
        (gateway.background.events)."""
        self.store = store
        self.emit = emit
        # Shared: assignments also go to the store, where other processes may receive the
        # feedback, and the store takes each id's one reward. Not shared: the join alone.
        self._shared = shared
        self.revision = 0
        self._routes: dict[str, Route] = {}
        self._served: dict[tuple[str, int, str], list[float]] = {}
        self._unsent: tuple[str, dict[tuple[str, int, str], ArmStats]] | None = None
        self.join = FeedbackJoin(feedback_ttl_s, feedback_max_entries, feedback_max_bytes)
        self._ttl = feedback_ttl_s
        self._flush_s = flush_s
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self._flushing = asyncio.Lock()
        self._store_failed = False
        self._stopping = False
        self.synced = asyncio.Event()
        # times this replica found the store behind it (restarted empty) and put its copy back
        self.store_resets = 0
        # The rollout templates and states this replica holds, put back with its policies (the
        # rollout engine, gateway.background.rollout, sets it to its copy).
        self.held_rollouts: Callable[[], RolloutCopy] = RolloutCopy

    # -- request path -------------------------------------------------------------------------
    def get(self, model: str) -> Route | None:
        return self._routes.get(model)

    def routes(self) -> dict[str, Route]:
        return dict(self._routes)

    @staticmethod
    def choose(
        route: Route,
        headers: Mapping[str, str],
        parameters: Mapping[str, Any],
        principal: str | None = None,
    ) -> Decision:
        policy = route.policy
        return policy.choose(sticky_key(policy.sticky, headers, parameters, principal))

    def served(self, route: Route, decision: Decision, request_id: str) -> None:
        """Count the request for the route's report; remember it for feedback when useful."""
        key = (route.model, route.revision, decision.version)
        cell = self._served.get(key)
        if cell is None:
            cell = self._served[key] = [0.0, 0.0, 0.0, 0.0]
        cell[0] += 1
        if route.doc.feedback:
            self.join.add(
                route.model, route.revision, request_id, decision.version, decision.propensity
            )

    # -- feedback -------------------------------------------------------------------------------
    async def feedback(self, model: str, request_id: str, reward: float) -> tuple[Assignment, bool]:
        """Credit ``reward`` to the version that served ``request_id``: (what served it, whether
        the id had already taken this very reward, which then changes nothing). One reward per
        id: a different one raises RewardConflict; with a shared store this holds fleet-wide
        (StoreUnavailable when the store cannot say)."""
        if not math.isfinite(reward):
            raise PolicyError("reward", f"must be a finite number, got {reward}")
        found = self.join.find(model, request_id)
        if found is not None:
            assignment, taken = found
        elif self._shared and (recalled := await self.store.recall(request_id)) is not None:
            assignment, taken = recalled, None
        else:
            raise UnknownInference(
                f"no inference {request_id!r} of model {model!r} is known: never served, past "
                "the feedback window, evicted, or served under an earlier policy revision"
            )
        route = self._routes.get(model)
        if assignment.model != model:
            raise UnknownInference(f"inference {request_id!r} was not served by model {model!r}")
        if route is None or route.revision != assignment.revision:
            now = "no policy" if route is None else f"revision {route.revision}"
            raise UnknownInference(
                f"inference {request_id!r} was served under policy revision "
                f"{assignment.revision} of {model!r}, which is now at {now}: feedback for it is "
                "no longer taken"
            )
        low, high = route.doc.reward_range
        if not low <= reward <= high:
            raise PolicyError(
                "reward", f"must be in [{low}, {high}] (the policy's reward_range), got {reward}"
            )
        if taken is None:
            if self._shared:
                taken = await self.store.claim(request_id, assignment, reward, self._ttl)
            else:
                key = (model, assignment.revision, assignment.version)
                cell = self._served.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                cell[1] += 1
                cell[2] += reward
                cell[3] += reward * reward
            self.join.settle(model, request_id, reward if taken is None else taken)
            if taken is None:
                return assignment, False
        if taken != reward:
            raise RewardConflict(request_id, taken, reward)
        return assignment, True

    # -- changes --------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read every policy from the store and rebuild the ones that changed.

        A store whose revision is below one this replica has seen lost its state (a Redis
        restarted without persistence). Taking its word would drop every policy: each model
        would fall back to its highest version, a canary's candidate to all of the traffic. So
        the replica first puts its own copy back (``StateStore.restore``), and keeps serving on
        it until the store holds it again."""
        revision, records = await self.store.routes()
        if revision < self.revision:
            await self._restore(revision)
            revision, records = await self.store.routes()
            if revision < self.revision:  # not restored: keep serving on the local copy
                return
        for model in [m for m in self._routes if m not in records]:
            del self._routes[model]
            self.join.retire(model, None)
            self._notify(None, model)
        for model, record in records.items():
            current = self._routes.get(model)
            if current is None or current.revision != record.revision:
                self._install(record)
        self.revision = revision
        await self._fold_bandits()
        self.synced.set()

    async def _restore(self, found: int) -> None:
        self.store_resets += 1
        log.error(
            "the state store is at revision %d, below the %d this replica has seen: it lost its "
            "state; putting back this replica's %d policies",
            found,
            self.revision,
            len(self._routes),
        )
        records = [RouteRecord(r.model, r.doc.as_json(), r.revision) for r in self._routes.values()]
        stats: dict[str, dict[str, ArmStats]] = {}
        for model, route in self._routes.items():
            bandit = bandit_of(route.policy)
            if bandit is not None:  # its totals as last folded from the fleet
                stats[model] = {
                    arm: ArmStats(rewards=round(rewards), reward_sum=reward_sum)
                    for arm, (rewards, reward_sum) in bandit.counts().items()
                }
        reason = (
            f"the state store was found at revision {found} after revision {self.revision}: "
            "put back from a replica's copy"
        )
        who = f"restore:{socket.gethostname()}:{os.getpid()}"
        rollouts = self.held_rollouts()
        target = max(self.revision, rollouts.revision)
        if await self.store.restore(target, records, stats, rollouts, who=who, reason=reason):
            log.warning(
                "state store restored to revision %d by this replica (%d rollout templates, "
                "%d rollout states)", target, len(rollouts.templates), len(rollouts.states),
            )  # fmt: skip

    async def write(
        self,
        model: str,
        doc: PolicyDoc | None,
        *,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
        artifacts: Mapping[str, str],
        details: Mapping[str, Any] | None = None,
    ) -> RouteRecord | None:
        """The one way a policy changes (admin API and guards alike): write it to the store with
        its audit entry, If-Match on ``expected``, then install it here at once. ``doc`` None
        deletes the policy. Raises StaleRevision or StoreUnavailable with nothing changed."""
        record = await self.store.put_route(
            model, doc.as_json() if doc is not None else None, expected=expected, who=who,
            action=action, reason=reason, artifacts=dict(artifacts),
            details=dict(details) if details is not None else None,
        )  # fmt: skip
        self.install(record, model)
        await self._changed(model, record, doc, who, action, reason)
        return record

    async def _changed(
        self,
        model: str,
        record: RouteRecord | None,
        doc: PolicyDoc | None,
        who: str,
        action: str,
        reason: str,
    ) -> None:
        """The ``policy.changed`` event of a write, as its audit entry has it."""
        revision: int | None = record.revision if record is not None else None
        if revision is None:  # a delete returns no record: its audit entry has the revision
            with contextlib.suppress(StoreUnavailable):
                entries = await self.store.audit(model, 1)
                revision = entries[0].revision if entries else None
        data = {
            "who": who,
            "why": reason,
            "revision": revision,
            "policy": doc.strategy if doc is not None else None,
            "action": action,
        }
        self.emit("policy.changed", model, data)

    def install(self, record: RouteRecord | None, model: str) -> None:
        """Apply a change this replica just wrote, without waiting for the watcher."""
        if record is None:
            if self._routes.pop(model, None) is not None:
                self.join.retire(model, None)
                self._notify(None, model)
        elif model not in self._routes or self._routes[model].revision < record.revision:
            self._install(record)
        if record is not None:
            self.revision = max(self.revision, record.revision)

    def _install(self, record: RouteRecord) -> None:
        try:
            doc = parse_policy(record.doc)
            policy = doc.policy(salt=record.model)
        except (PolicyError, ValueError) as exc:  # a document that was valid when written
            log.error("cannot build policy of %s rev %d: %s", record.model, record.revision, exc)
            return
        route = Route(record.model, record.revision, doc, policy)
        self._routes[record.model] = route
        self.join.retire(record.model, record.revision)
        self._notify(route, record.model)

    def _notify(self, route: Route | None, model: str) -> None:
        if self._on_change is not None:
            self._on_change(route, model)

    # -- background -----------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._flush_loop())]

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background tasks, then push what is buffered. The flush loop is asked to
        stop, not cancelled: a flush cancelled mid-write would leave its counts neither written
        nor buffered. Waits are bounded: a shutdown once hung on a flush loop that had survived
        its cancellation (seen in a hung gateway; the cause was not found)."""
        self._stopping = True
        watch, flusher = self._tasks or (None, None)
        if watch is not None:
            watch.cancel()
        pending = {t for t in (watch, flusher) if t is not None}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        for task in pending:
            log.error("routing table: %s did not stop within %s s; leaving it", task, timeout_s)
            task.cancel()
        with contextlib.suppress(StoreUnavailable):
            await self.flush()

    async def _watch(self) -> None:
        async for revision in self.store.watch():
            if revision != self.revision or not self.synced.is_set():
                try:
                    await self.refresh()
                except StoreUnavailable as exc:
                    log.warning("routing state not refreshed: %s", exc)

    async def _flush_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
                await self._fold_bandits()
            except StoreUnavailable as exc:
                log.warning("routing statistics not flushed (kept for the next try): %s", exc)

    async def flush(self) -> None:
        """Push buffered counts and assignments; on failure they stay buffered.

        After a failure nothing more is written until the store answers a ping: a write that
        timed out against a hung store still runs when the store resumes, so there is no point
        queueing one per tick of an outage. The stats batch in flight when the store failed is
        in doubt (it may run on resume): it is kept as it was and resent with the same batch id,
        which the store applies at most once; counts taken meanwhile wait for the next batch.
        """
        async with self._flushing:
            if self._store_failed and not await self.store.ping():
                raise StoreUnavailable("the state store has not answered since it failed")
            self._store_failed = False
            try:
                await self._push()
            except StoreUnavailable:
                self._store_failed = True
                raise

    async def _push(self) -> None:
        self.join.expire()
        if self._unsent is not None:  # in doubt: the same batch again, under the same id
            await self.store.add_stats(self._unsent[1], batch=self._unsent[0])
            self._unsent = None
        if self._served:
            deltas = {
                k: ArmStats(int(c[0]), int(c[1]), c[2], c[3]) for k, c in self._served.items()
            }
            self._served = {}
            self._unsent = (uuid.uuid4().hex, deltas)
            await self.store.add_stats(deltas, batch=self._unsent[0])
            self._unsent = None
        if self._shared:
            unsent, mark = self.join.unsent()
            if unsent:
                await self.store.remember(unsent, self._ttl)
            self.join.sent(mark)

    async def _fold_bandits(self) -> None:
        """Rebuild every bandit from the fleet's reward totals for its revision."""
        for model, route in list(self._routes.items()):
            bandit = bandit_of(route.policy)
            if bandit is None:
                continue
            totals = await self.store.stats(model, route.revision)
            zero = ArmStats()
            counts = {
                arm: (float(totals.get(arm, zero).rewards), totals.get(arm, zero).reward_sum)
                for arm in bandit.arms
            }
            held = bandit.counts()
            if counts == held or self._routes.get(model) is not route:
                continue
            if any(counts[arm][0] < pulls for arm, (pulls, _) in held.items()):
                # Fleet totals only grow: fewer means the store lost them (refresh restores).
                continue
            try:
                updated = with_bandit(route.policy, bandit.with_counts(counts))
            except PolicyError as exc:
                log.error("bandit state of %s is inconsistent: %s", model, exc)
                continue
            self._routes[model] = Route(model, route.revision, route.doc, updated)
