"""The routing state store: policy documents with revisions, the audit trail, arm statistics,
inference assignments and the one reward each inference id may take. Off the hot path: the
gateway caches what it reads here and talks to the store from background tasks, admin calls and
feedback only.

Every change takes the next global revision and appends one audit entry in the same atomic step.
The audit trail is append-only; the global trail and each model's trail keep their newest
``AUDIT_CAP`` entries. Documents and audit entries are held as JSON (orjson) in both
implementations, so what you read back is always a fresh copy, never the caller's dict.
This module does not import redis; the composition root (gateway.app) chooses the store.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson

from router.policy.limits import LocalLimiter, Refusal, Rule

AUDIT_CAP = 100_000
# An audit page stops once its entries pass this many bytes (always at least one entry), so one
# read never holds the event loop for long however large the entries are.
AUDIT_PAGE_BYTES = 1 << 20
MAX_WHO_CHARS = 200  # an audit entry's ``who`` is cut to this (token names come from settings)
# The audit trail's "model" of a rate-limits change (GET /admin/audit?model=_limits).
LIMITS_AUDIT = "_limits"
# How long a store remembers that a stats batch was applied. A batch whose write timed out is
# resent, with the same id, once the store answers again; the first copy, if it was applied,
# ran no later than that. Ten minutes covers any resend after the store came back.
BATCH_MEMORY_S = 600.0
V = TypeVar("V")


class StoreError(Exception):
    """Base of the store's own errors."""


class StaleRevision(StoreError):
    """The If-Match revision did not match; ``current`` is the model's revision (0 = no record)."""

    def __init__(self, model: str, expected: int, current: int) -> None:
        super().__init__(f"{model!r} is at revision {current}, not {expected}")
        self.model = model
        self.expected = expected
        self.current = current


class StoreUnavailable(StoreError):
    """The backend cannot be reached (or answered with an error)."""


@dataclass(frozen=True, slots=True)
class RouteRecord:
    model: str
    doc: dict[str, Any]
    revision: int  # the global revision at which it was written


@dataclass(frozen=True, slots=True)
class AuditEntry:
    revision: int
    at: float  # unix seconds, assigned by the store
    who: str
    model: str
    action: str
    reason: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    artifacts: dict[str, str]  # version -> sha256
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """Audit entries as stored (JSON objects, newest first) and the cursor of the page after
    (None: this is the last). Entries of a trail are numbered 1, 2, ... as they are appended; a
    cursor is the number of the first entry of its page, so pages do not shift when entries are
    appended between reads."""

    entries: list[bytes]
    next: int | None


def page_of(
    raw: Sequence[bytes], total: int, length: int, start: int, max_bytes: int | None
) -> AuditPage:
    """The page of ``raw``, the entries of a trail from index ``start`` (newest first), cut at
    ``max_bytes``; the trail holds ``length`` entries of the ``total`` ever appended to it."""
    kept = len(raw)
    if max_bytes is not None:
        size = 0
        for i, entry in enumerate(raw):
            size += len(entry)
            if i and size > max_bytes:
                kept = i
                break
    end = start + kept
    following = total - end
    return AuditPage(list(raw[:kept]), following if end < length and following > 0 else None)


@dataclass(frozen=True, slots=True)
class AuditNote:
    """An audit entry that changes no policy (an approval, a rejection): who, what, why."""

    who: str
    action: str
    reason: str
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ArmStats:
    """Additive totals of one (model, revision, version)."""

    served: int = 0
    rewards: int = 0
    reward_sum: float = 0.0
    reward_sumsq: float = 0.0

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(
            self.served + other.served,
            self.rewards + other.rewards,
            self.reward_sum + other.reward_sum,
            self.reward_sumsq + other.reward_sumsq,
        )


@dataclass(frozen=True, slots=True)
class RolloutCopy:
    """A replica's copy of the rollout templates and states (gateway.background.rollout), as it
    last read or wrote them: model -> (revision, template) and model -> (sequence number,
    state). ``StateStore.restore`` puts them back after the store lost its state."""

    templates: Mapping[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    states: Mapping[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def revision(self) -> int:
        """The highest global revision it names (its templates'; 0 with none)."""
        return max((revision for revision, _ in self.templates.values()), default=0)


@dataclass(frozen=True, slots=True)
class Assignment:
    """What served an inference id, kept for the feedback join."""

    model: str
    version: str
    revision: int
    propensity: float


class StateStore(Protocol):
    async def routes(self) -> tuple[int, dict[str, RouteRecord]]:
        """(global revision, every model's record), read consistently."""
        ...

    async def revision(self) -> int: ...

    async def put_route(
        self,
        model: str,
        doc: dict[str, Any] | None,
        *,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
        artifacts: dict[str, str],
        details: dict[str, Any] | None = None,
    ) -> RouteRecord | None:
        """Atomically check ``expected`` against the model's revision (0 = no record; None skips
        the check), take the next global revision, store ``doc`` (None deletes), append the audit
        entry and notify watchers. Raises StaleRevision and changes nothing on a mismatch."""
        ...

    async def audit(self, model: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first; all models when ``model`` is None."""
        ...

    async def audit_page(
        self,
        model: str | None,
        limit: int,
        cursor: int | None = None,
        max_bytes: int | None = AUDIT_PAGE_BYTES,
    ) -> AuditPage:
        """Up to ``limit`` entries of the trail (all models when ``model`` is None) from
        ``cursor`` (None: the newest), stopping past ``max_bytes``."""
        ...

    async def restore(
        self,
        revision: int,
        records: Sequence[RouteRecord],
        stats: Mapping[str, Mapping[str, ArmStats]],
        rollouts: RolloutCopy | None = None,
        *,
        who: str,
        reason: str,
    ) -> bool:
        """Put back what a store that lost its state (a Redis restarted without persistence)
        held, as one replica last saw it; all in one atomic step, and only while the store's
        revision is below ``revision`` (the highest the caller saw), so of several replicas that
        notice, the first restores and the others change nothing. Raises the revision counter to
        ``revision``; puts back each record whose model has none now (under its own revision,
        so replicas that hold it rebuild nothing), with an audit entry ``restore`` and the
        totals ``stats[model][version]`` of its revision; puts back each rollout template and
        rollout state of ``rollouts`` whose model has none now, under its own revision or
        sequence number (no audit entry: the policies' entries mark the restore); notifies
        watchers. Returns whether it restored."""
        ...

    async def add_stats(self, deltas: Mapping[tuple[str, int, str], ArmStats], batch: str) -> None:
        """Add (model, revision, version) -> increments, all in one atomic step, once per
        ``batch`` id: the same batch sent again within BATCH_MEMORY_S changes nothing, so a
        caller whose write is in doubt (timed out) resends it safely."""
        ...

    async def stats(self, model: str, revision: int) -> dict[str, ArmStats]: ...

    async def remember(self, assignments: Mapping[str, Assignment], ttl_s: float) -> None: ...

    async def recall(self, request_id: str) -> Assignment | None: ...

    async def claim(
        self, request_id: str, assignment: Assignment, reward: float, ttl_s: float
    ) -> float | None:
        """Take ``reward`` as the one reward of ``request_id`` (for ``ttl_s`` seconds) and add it
        to the totals of the assignment's (model, revision, version), in one atomic step, and
        return None. When the id already has a reward, change nothing and return that reward.
        Of concurrent claims across processes sharing the backend exactly one is taken. A claim
        whose call failed (timed out) may still apply later; tried again, it returns its
        reward, so a reward is counted once whatever the caller heard."""
        ...

    def watch(self) -> AsyncIterator[int]:
        """Yield the current global revision first, then each new one (at least the latest of a
        burst). Never raises on backend loss: it retries and yields again once back. Ends
        after close(); otherwise stop it by cancelling the task that iterates it."""
        ...

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease ``name`` for ``holder`` for ``ttl_s`` seconds, or extend it by
        ``ttl_s`` from now when ``holder`` already has it. False, changing nothing, while another
        holder's lease runs. Atomic across processes sharing the backend."""
        ...

    async def publish_counts(self, member: str, blobs: Mapping[str, bytes], ttl_s: float) -> None:
        """Replace ``member``'s published counters (field -> opaque bytes); they vanish
        ``ttl_s`` seconds after the last publish, so a dead process drops out by itself."""
        ...

    async def read_counts(
        self, prefix: str = "", fields: Sequence[str] | None = None
    ) -> dict[str, dict[str, bytes]]:
        """Every live member whose name starts with ``prefix`` -> its published counters; only
        the ``fields`` named, when given (a member that published none of them is left out),
        so that a small fact costs its own bytes, not every member's whole publish."""
        ...

    async def put_limits(self, doc: dict[str, Any], *, who: str, reason: str) -> int:
        """Replace the rate-limits document (gateway.http.limits) and append its audit entry
        (model ``LIMITS_AUDIT``, action ``limits``) under the next global revision, in one atomic
        step; returns that revision."""
        ...

    async def limits(self) -> dict[str, Any] | None:
        """The rate-limits document last put, or None."""
        ...

    async def take_limits(
        self, principal: str, model: str, rule: Rule, rows: int
    ) -> Refusal | None:
        """Take one request of ``rows`` rows from ``principal``'s buckets on ``model`` under
        ``rule``, all or nothing (``LocalLimiter.take``); the Refusal when over a limit. Shared
        by every process on the backend."""
        ...

    async def put_rollout(
        self,
        model: str,
        doc: dict[str, Any] | None,
        *,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
    ) -> int:
        """Replace (``doc`` None: delete) the model's rollout template and append its audit entry
        under the next global revision, in one atomic step; returns that revision, which is the
        template's. If-Match on ``expected`` (0: no template yet), else StaleRevision."""
        ...

    async def rollouts(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Every model's rollout template: model -> (revision, document)."""
        ...

    async def put_rollout_state(
        self, model: str, state: dict[str, Any], *, expected: int, note: AuditNote | None = None
    ) -> int:
        """Replace the model's rollout state if its sequence number is ``expected`` (0: none
        yet), else StaleRevision; with ``note``, append that audit entry (under the next global
        revision) in the same atomic step. Returns the new sequence number."""
        ...

    async def rollout_states(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Every model's rollout state: model -> (sequence number, state)."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers; False (never an exception) when it does not."""
        ...

    async def close(self) -> None: ...


def audit_body(
    who: str,
    model: str,
    action: str,
    reason: str,
    after: bytes | None,
    artifacts: dict[str, str],
    details: dict[str, Any] | None,
) -> bytes:
    """The JSON object of an audit entry without revision, at and before (the store adds them)."""
    return orjson.dumps(
        {
            "who": who[:MAX_WHO_CHARS],
            "model": model,
            "action": action,
            "reason": reason,
            "after": orjson.Fragment(after) if after is not None else None,
            "artifacts": artifacts,
            "details": details or {},
        }
    )


def audit_entry(revision: int, at: float, before: bytes | None, body: bytes) -> bytes:
    """Splice revision, at and before into ``body``, as the Redis script does."""
    head = orjson.dumps(
        {
            "revision": revision,
            "at": at,
            "before": orjson.Fragment(before) if before is not None else None,
        }
    )
    return head[:-1] + b"," + body[1:]


def decode_entry(raw: bytes | str) -> AuditEntry:
    d = orjson.loads(raw)
    return AuditEntry(
        revision=int(d["revision"]),
        at=float(d["at"]),
        who=d["who"],
        model=d["model"],
        action=d["action"],
        reason=d["reason"],
        before=d["before"],
        after=d["after"],
        artifacts=d["artifacts"],
        details=d["details"],
    )


def encode_assignment(a: Assignment) -> bytes:
    return orjson.dumps([a.model, a.version, a.revision, a.propensity])


def decode_assignment(raw: bytes | str) -> Assignment:
    model, version, revision, propensity = orjson.loads(raw)
    return Assignment(model, version, int(revision), float(propensity))


def take_lease(leases: dict[str, tuple[str, float]], name: str, holder: str, ttl_s: float) -> bool:
    """``StateStore.acquire_lease`` on a dict of name -> (holder, monotonic deadline)."""
    now = time.monotonic()
    current = leases.get(name)
    if current is not None and current[0] != holder and current[1] > now:
        return False
    leases[name] = (holder, now + ttl_s)
    return True


class _Expiring(Generic[V]):
    """A map whose entries vanish ``ttl_s`` seconds after they were put, as Redis's PX keys."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[float, V]] = {}  # key -> (deadline, value)
        self._deadlines: list[tuple[float, str]] = []  # heap, so expiry costs O(log n)

    def put(self, key: str, value: V, ttl_s: float) -> None:
        now = time.monotonic()
        self._expire(now)
        self._kept[key] = (now + ttl_s, value)
        heapq.heappush(self._deadlines, (now + ttl_s, key))

    def get(self, key: str) -> V | None:
        now = time.monotonic()
        self._expire(now)
        kept = self._kept.get(key)
        return kept[1] if kept is not None and kept[0] > now else None

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self._deadlines)
            kept = self._kept.get(key)
            if kept is not None and kept[0] == deadline:  # not put again since
                del self._kept[key]


class MemoryStore:
    """State of a single process. No method awaits between reading and writing its state, so
    each one is atomic with respect to the other tasks on the event loop. A gateway on this
    store joins feedback and takes rewards in its route table's bounded join alone
    (``RouteTable(shared=False)``); assignments and claims are kept here only for tables that
    share one store as replicas share Redis (tests)."""

    def __init__(self) -> None:
        self._revision = 0
        self._docs: dict[str, tuple[int, bytes]] = {}  # model -> (revision, JSON doc)
        self._audit: deque[bytes] = deque(maxlen=AUDIT_CAP)
        self._model_audit: dict[str, deque[bytes]] = {}
        self._appended: dict[str, int] = {}  # "" (global) or model -> entries ever appended
        self._limits: bytes | None = None
        self._limiter = LocalLimiter()
        self._stats: dict[tuple[str, int], dict[str, ArmStats]] = {}
        self._batches: OrderedDict[str, float] = OrderedDict()  # applied batch -> forget after
        self._assignments: _Expiring[Assignment] = _Expiring()
        self._claims: _Expiring[float] = _Expiring()
        self._changed = asyncio.Event()  # replaced after each set: one event per change
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, monotonic deadline)
        self._counts: dict[str, tuple[float, dict[str, bytes]]] = {}  # member -> (deadline, blobs)
        self._rollouts: dict[str, tuple[int, bytes]] = {}  # model -> (revision, template JSON)
        self._rollout_states: dict[str, tuple[int, bytes]] = {}  # model -> (sequence, JSON)
        self._closed = False

    async def routes(self) -> tuple[int, dict[str, RouteRecord]]:
        records = {
            model: RouteRecord(model, orjson.loads(doc), revision)
            for model, (revision, doc) in self._docs.items()
        }
        return self._revision, records

    async def revision(self) -> int:
        return self._revision

    async def put_route(
        self,
        model: str,
        doc: dict[str, Any] | None,
        *,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
        artifacts: dict[str, str],
        details: dict[str, Any] | None = None,
    ) -> RouteRecord | None:
        previous = self._docs.get(model)
        current = previous[0] if previous else 0
        if expected is not None and expected != current:
            raise StaleRevision(model, expected, current)
        # serialise before touching any state, so a bad document changes nothing
        after = None if doc is None else orjson.dumps(doc)
        body = audit_body(who, model, action, reason, after, artifacts, details)
        revision = self._revision + 1
        entry = audit_entry(revision, time.time(), previous[1] if previous else None, body)

        self._revision = revision
        if after is None:
            self._docs.pop(model, None)
        else:
            self._docs[model] = (revision, after)
        self._append(model, entry)
        self._changed.set()
        self._changed = asyncio.Event()
        return None if after is None else RouteRecord(model, orjson.loads(after), revision)

    async def audit(self, model: str | None = None, limit: int = 100) -> list[AuditEntry]:
        page = await self.audit_page(model, limit, max_bytes=None)
        return [decode_entry(raw) for raw in page.entries]

    async def audit_page(
        self,
        model: str | None,
        limit: int,
        cursor: int | None = None,
        max_bytes: int | None = AUDIT_PAGE_BYTES,
    ) -> AuditPage:
        trail = self._audit if model is None else self._model_audit.get(model, deque())
        total = self._appended.get(model or "", 0)
        start = 0 if cursor is None else max(0, total - cursor)
        raw = list(itertools.islice(reversed(trail), start, start + max(limit, 0)))
        return page_of(raw, total, len(trail), start, max_bytes)

    def _append(self, model: str, entry: bytes) -> None:
        self._audit.append(entry)
        self._model_audit.setdefault(model, deque(maxlen=AUDIT_CAP)).append(entry)
        for trail in ("", model):
            self._appended[trail] = self._appended.get(trail, 0) + 1

    async def restore(
        self,
        revision: int,
        records: Sequence[RouteRecord],
        stats: Mapping[str, Mapping[str, ArmStats]],
        rollouts: RolloutCopy | None = None,
        *,
        who: str,
        reason: str,
    ) -> bool:
        if self._revision >= revision:
            return False
        copy = rollouts or RolloutCopy()
        for model, (at, template) in copy.templates.items():
            self._rollouts.setdefault(model, (at, orjson.dumps(template)))
        for model, (seq, state) in copy.states.items():
            self._rollout_states.setdefault(model, (seq, orjson.dumps(state)))
        docs = [(r, orjson.dumps(r.doc)) for r in records if r.model not in self._docs]
        now = time.time()
        self._revision = revision
        for record, doc in docs:
            self._docs[record.model] = (record.revision, doc)
            body = audit_body(who, record.model, "restore", reason, doc, {}, None)
            self._append(record.model, audit_entry(record.revision, now, None, body))
            totals = stats.get(record.model, {}).items()
            self._add({(record.model, record.revision, v): t for v, t in totals})
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def add_stats(self, deltas: Mapping[tuple[str, int, str], ArmStats], batch: str) -> None:
        now = time.monotonic()
        while self._batches and next(iter(self._batches.values())) <= now:
            self._batches.popitem(last=False)
        if batch in self._batches:
            return
        self._batches[batch] = now + BATCH_MEMORY_S
        self._add(deltas)

    def _add(self, deltas: Mapping[tuple[str, int, str], ArmStats]) -> None:
        zero = ArmStats()
        for (model, revision, version), delta in deltas.items():
            if delta != zero:  # as in Redis, an all-zero delta creates no entry
                table = self._stats.setdefault((model, revision), {})
                table[version] = table.get(version, zero) + delta

    async def stats(self, model: str, revision: int) -> dict[str, ArmStats]:
        return dict(self._stats.get((model, revision), {}))

    async def remember(self, assignments: Mapping[str, Assignment], ttl_s: float) -> None:
        for request_id, assignment in assignments.items():
            self._assignments.put(request_id, assignment, ttl_s)

    async def recall(self, request_id: str) -> Assignment | None:
        return self._assignments.get(request_id)

    async def claim(
        self, request_id: str, assignment: Assignment, reward: float, ttl_s: float
    ) -> float | None:
        taken = self._claims.get(request_id)
        if taken is not None:
            return taken
        self._claims.put(request_id, reward, ttl_s)
        key = (assignment.model, assignment.revision, assignment.version)
        self._add({key: ArmStats(0, 1, reward, reward * reward)})
        return None

    async def watch(self) -> AsyncIterator[int]:
        last: int | None = None
        while not self._closed:
            if self._revision != last:
                last = self._revision
                yield last
            else:
                await self._changed.wait()

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return take_lease(self._leases, name, holder, ttl_s)

    async def publish_counts(self, member: str, blobs: Mapping[str, bytes], ttl_s: float) -> None:
        self._counts[member] = (time.monotonic() + ttl_s, dict(blobs))

    async def read_counts(
        self, prefix: str = "", fields: Sequence[str] | None = None
    ) -> dict[str, dict[str, bytes]]:
        now = time.monotonic()
        for member in [m for m, (deadline, _) in self._counts.items() if deadline <= now]:
            del self._counts[member]
        found = {m: dict(b) for m, (_, b) in self._counts.items() if m.startswith(prefix)}
        if fields is None:
            return found
        picked = {m: {f: b[f] for f in fields if f in b} for m, b in found.items()}
        return {m: b for m, b in picked.items() if b}

    async def put_limits(self, doc: dict[str, Any], *, who: str, reason: str) -> int:
        after = orjson.dumps(doc)
        body = audit_body(who, LIMITS_AUDIT, "limits", reason, after, {}, None)
        self._revision += 1
        entry = audit_entry(self._revision, time.time(), self._limits, body)
        self._limits = after
        self._append(LIMITS_AUDIT, entry)
        return self._revision

    async def limits(self) -> dict[str, Any] | None:
        return None if self._limits is None else dict(orjson.loads(self._limits))

    async def take_limits(
        self, principal: str, model: str, rule: Rule, rows: int
    ) -> Refusal | None:
        return self._limiter.take(principal, model, rule, rows, time.time())

    async def put_rollout(
        self,
        model: str,
        doc: dict[str, Any] | None,
        *,
        expected: int | None,
        who: str,
        action: str,
        reason: str,
    ) -> int:
        previous = self._rollouts.get(model)
        current = previous[0] if previous else 0
        if expected is not None and expected != current:
            raise StaleRevision(model, expected, current)
        after = None if doc is None else orjson.dumps(doc)
        body = audit_body(who, model, action, reason, after, {}, None)
        self._revision += 1
        entry = audit_entry(self._revision, time.time(), previous[1] if previous else None, body)
        if after is None:
            self._rollouts.pop(model, None)
        else:
            self._rollouts[model] = (self._revision, after)
        self._append(model, entry)
        return self._revision

    async def rollouts(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return {m: (rev, orjson.loads(doc)) for m, (rev, doc) in self._rollouts.items()}

    async def put_rollout_state(
        self, model: str, state: dict[str, Any], *, expected: int, note: AuditNote | None = None
    ) -> int:
        current = self._rollout_states.get(model, (0, b""))[0]
        if expected != current:
            raise StaleRevision(model, expected, current)
        raw = orjson.dumps(state)
        entry = None
        if note is not None:
            body = audit_body(note.who, model, note.action, note.reason, None, {}, note.details)
            entry = audit_entry(self._revision + 1, time.time(), None, body)
        self._rollout_states[model] = (current + 1, raw)
        if entry is not None:
            self._revision += 1
            self._append(model, entry)
        return current + 1

    async def rollout_states(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return {m: (seq, orjson.loads(raw)) for m, (seq, raw) in self._rollout_states.items()}

    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        self._changed.set()
