"""The routing state store: policy documents with revisions, the audit trail, arm statistics and
inference assignments. Off the hot path: the gateway caches what it reads here and talks to the
store from background tasks and admin calls only.

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
from typing import Any, Protocol

import orjson

from router.policy.limits import LocalLimiter, Refusal, Rule

AUDIT_CAP = 100_000
# The audit trail's "model" of a rate-limits change (GET /admin/audit?model=_limits).
LIMITS_AUDIT = "_limits"
# How long a store remembers that a stats batch was applied. A batch whose write timed out is
# resent, with the same id, once the store answers again; the first copy, if it was applied,
# ran no later than that. Ten minutes covers any resend after the store came back.
BATCH_MEMORY_S = 600.0


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

    async def restore(
        self,
        revision: int,
        records: Sequence[RouteRecord],
        stats: Mapping[str, Mapping[str, ArmStats]],
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
        totals ``stats[model][version]`` of its revision; notifies watchers. Returns whether it
        restored."""
        ...

    async def add_stats(self, deltas: Mapping[tuple[str, int, str], ArmStats], batch: str) -> None:
        """Add (model, revision, version) -> increments, all in one atomic step, once per
        ``batch`` id: the same batch sent again within BATCH_MEMORY_S changes nothing, so a
        caller whose write is in doubt (timed out) resends it safely."""
        ...

    async def stats(self, model: str, revision: int) -> dict[str, ArmStats]: ...

    async def remember(self, assignments: Mapping[str, Assignment], ttl_s: float) -> None: ...

    async def recall(self, request_id: str) -> Assignment | None: ...

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

    async def read_counts(self, prefix: str = "") -> dict[str, dict[str, bytes]]:
        """Every live member whose name starts with ``prefix`` -> its published counters."""
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
            "who": who,
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


class MemoryStore:
    """State of a single process. No method awaits between reading and writing its state, so
    each one is atomic with respect to the other tasks on the event loop."""

    def __init__(self) -> None:
        self._revision = 0
        self._docs: dict[str, tuple[int, bytes]] = {}  # model -> (revision, JSON doc)
        self._audit: deque[bytes] = deque(maxlen=AUDIT_CAP)
        self._model_audit: dict[str, deque[bytes]] = {}
        self._limits: bytes | None = None
        self._limiter = LocalLimiter()
        self._stats: dict[tuple[str, int], dict[str, ArmStats]] = {}
        self._batches: OrderedDict[str, float] = OrderedDict()  # applied batch -> forget after
        self._assignments: dict[str, tuple[float, Assignment]] = {}  # id -> (deadline, value)
        self._deadlines: list[tuple[float, str]] = []  # heap, so expiry costs O(log n)
        self._changed = asyncio.Event()  # replaced after each set: one event per change
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, monotonic deadline)
        self._counts: dict[str, tuple[float, dict[str, bytes]]] = {}  # member -> (deadline, blobs)
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
        self._audit.append(entry)
        self._model_audit.setdefault(model, deque(maxlen=AUDIT_CAP)).append(entry)
        self._changed.set()
        self._changed = asyncio.Event()
        return None if after is None else RouteRecord(model, orjson.loads(after), revision)

    async def audit(self, model: str | None = None, limit: int = 100) -> list[AuditEntry]:
        trail = self._audit if model is None else self._model_audit.get(model, deque())
        return [decode_entry(raw) for raw in itertools.islice(reversed(trail), max(limit, 0))]

    async def restore(
        self,
        revision: int,
        records: Sequence[RouteRecord],
        stats: Mapping[str, Mapping[str, ArmStats]],
        *,
        who: str,
        reason: str,
    ) -> bool:
        if self._revision >= revision:
            return False
        docs = [(r, orjson.dumps(r.doc)) for r in records if r.model not in self._docs]
        now = time.time()
        self._revision = revision
        for record, doc in docs:
            self._docs[record.model] = (record.revision, doc)
            body = audit_body(who, record.model, "restore", reason, doc, {}, None)
            entry = audit_entry(record.revision, now, None, body)
            self._audit.append(entry)
            self._model_audit.setdefault(record.model, deque(maxlen=AUDIT_CAP)).append(entry)
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
        now = time.monotonic()
        self._expire(now)
        for request_id, assignment in assignments.items():
            self._assignments[request_id] = (now + ttl_s, assignment)
            heapq.heappush(self._deadlines, (now + ttl_s, request_id))

    async def recall(self, request_id: str) -> Assignment | None:
        now = time.monotonic()
        self._expire(now)
        kept = self._assignments.get(request_id)
        return kept[1] if kept is not None and kept[0] > now else None

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, request_id = heapq.heappop(self._deadlines)
            kept = self._assignments.get(request_id)
            if kept is not None and kept[0] == deadline:  # not re-remembered since
                del self._assignments[request_id]

    async def watch(self) -> AsyncIterator[int]:
        last: int | None = None
        while not self._closed:
            if self._revision != last:
                last = self._revision
                yield last
            else:
                await self._changed.wait()

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(name)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[name] = (holder, now + ttl_s)
        return True

    async def publish_counts(self, member: str, blobs: Mapping[str, bytes], ttl_s: float) -> None:
        self._counts[member] = (time.monotonic() + ttl_s, dict(blobs))

    async def read_counts(self, prefix: str = "") -> dict[str, dict[str, bytes]]:
        now = time.monotonic()
        for member in [m for m, (deadline, _) in self._counts.items() if deadline <= now]:
            del self._counts[member]
        return {m: dict(b) for m, (_, b) in self._counts.items() if m.startswith(prefix)}

    async def put_limits(self, doc: dict[str, Any], *, who: str, reason: str) -> int:
        after = orjson.dumps(doc)
        body = audit_body(who, LIMITS_AUDIT, "limits", reason, after, {}, None)
        self._revision += 1
        entry = audit_entry(self._revision, time.time(), self._limits, body)
        self._limits = after
        self._audit.append(entry)
        self._model_audit.setdefault(LIMITS_AUDIT, deque(maxlen=AUDIT_CAP)).append(entry)
        return self._revision

    async def limits(self) -> dict[str, Any] | None:
        return None if self._limits is None else dict(orjson.loads(self._limits))

    async def take_limits(
        self, principal: str, model: str, rule: Rule, rows: int
    ) -> Refusal | None:
        return self._limiter.take(principal, model, rule, rows, time.time())

    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        self._changed.set()
