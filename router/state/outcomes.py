"""The outcome join: which version served each inference id, and what it predicted, so that a
label posted days later (``POST /v2/models/{m}/outcomes``) is credited to it, once.

A served prediction is (model, inference id) -> (version, value, served at): ``value`` is the
one number the quality accumulators need (gateway.serving.task). Each id takes one label: the
same label again is a duplicate that changes nothing, a different one a conflict.

Two stores, one interface:
- ``MemoryPredictions``: the process's own, bounded by entries and bytes (the oldest go first,
  counted as evictions); for a single gateway without Redis.
- ``RedisPredictions`` (router.state.redis_outcomes): the fleet's, one hash per id with a
  TTL, so a prediction served by one replica joins a label posted to another, and the horizon
  (7 days by default) costs Redis memory, not the process heap. Writes are batched (one
  pipeline per flush), never one per request; labels are claimed by a script per 1,000 ids.

Both keep a record for the horizon and an eighth of it more (``GRACE_SHARE``): a label for a
prediction older than the horizon is then told ``expired`` rather than ``unknown``, and after
that the record is gone (``unknown``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from router.state.join import id_bytes

Result = Literal["accepted", "duplicate", "conflict", "unknown", "expired"]
RESULTS: tuple[Result, ...] = ("accepted", "duplicate", "conflict", "unknown", "expired")
GRACE_SHARE = 0.125
# Ids claimed by one script: a batch of 10,000 takes ten, so Redis never runs one for long.
CLAIM_CHUNK = 1000
# Bytes a MemoryPredictions entry holds besides its id: the (model, id) key tuple, the entry
# list with its two floats, and the OrderedDict's node and slot (tracemalloc, test_outcomes).
ENTRY_BYTES = 280
EVICTION_REASONS = ("entries", "bytes")


class Served(NamedTuple):
    """A prediction to remember: ``at`` is the wall-clock time it was served. A tuple: the
    flush makes one per remembered request."""

    model: str
    request_id: str
    version: str
    value: float
    at: float


@dataclass(frozen=True, slots=True)
class Claimed:
    """What happened to one label: with ``accepted``, the version and value it joins."""

    result: Result
    version: str | None = None
    value: float | None = None


class PredictionStore(Protocol):
    horizon_s: float

    async def remember(self, served: Sequence[Served]) -> None:
        """Keep these predictions for the horizon; StoreUnavailable when the store is down."""

    async def claim(
        self, model: str, labels: Sequence[tuple[str, float]], now: float
    ) -> list[Claimed]:
        """Give each (id, label) its one label, in order (an id twice in ``labels``: the second
        is a duplicate or a conflict). ``now``: wall-clock seconds."""
        ...

    async def close(self) -> None: ...


class MemoryPredictions:
    """Owned by one event loop thread: no locks."""

    def __init__(self, horizon_s: float, max_entries: int, max_bytes: int) -> None:
        self.horizon_s = horizon_s
        self._keep_s = horizon_s * (1.0 + GRACE_SHARE)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        # (model, id) -> [served at, version, value, label or None], oldest first
        # (model, id) -> (the prediction, the label it took or None), oldest first
        self._entries: OrderedDict[tuple[str, str], tuple[Served, float | None]] = OrderedDict()
        self.bytes = 0
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def remember(self, served: Sequence[Served]) -> None:
        self.expire(time.time())
        entries = self._entries
        for s in served:
            key = (s.model, s.request_id)
            old = entries.pop(key, None)
            if old is not None:  # served again: the newest prediction, the label it took
                entries[key] = (s, old[1])
                continue
            entries[key] = (s, None)
            self.bytes += id_bytes(s.request_id) + ENTRY_BYTES
            while len(entries) > self._max_entries:
                self._pop_oldest("entries")
            while self.bytes > self._max_bytes:
                self._pop_oldest("bytes")

    async def claim(
        self, model: str, labels: Sequence[tuple[str, float]], now: float
    ) -> list[Claimed]:
        self.expire(now)
        out: list[Claimed] = []
        for request_id, label in labels:
            entry = self._entries.get((model, request_id))
            if entry is None:
                out.append(Claimed("unknown"))
                continue
            served, taken = entry
            at = served.at
            if now - at > self._keep_s:  # as Redis would have let it go (expire() pops in order)
                out.append(Claimed("unknown"))
            elif now - at > self.horizon_s:
                out.append(Claimed("expired"))
            elif taken is not None:
                out.append(Claimed("duplicate" if taken == label else "conflict"))
            else:
                self._entries[(model, request_id)] = (served, label)
                out.append(Claimed("accepted", served.version, served.value))
        return out

    def expire(self, now: float) -> None:
        """Drop records past the horizon and its grace (not counted as evictions)."""
        entries = self._entries
        while entries:
            if next(iter(entries.values()))[0].at + self._keep_s > now:
                break
            self._pop_oldest(None)

    def _pop_oldest(self, reason: str | None) -> None:
        (_, request_id), _ = self._entries.popitem(last=False)
        self.bytes -= id_bytes(request_id) + ENTRY_BYTES
        if reason is not None:
            self.evictions[reason] += 1

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


def prediction_bytes(request_id: str) -> int:
    """What MemoryPredictions counts for one entry."""
    return id_bytes(request_id) + ENTRY_BYTES
