"""The feedback join: which version served each recent inference id under a model's current
policy revision, so that a reward posted later is credited to it, once.

Client-supplied ids are kept here for the feedback window, so the join is bounded: ids are at
most ``MAX_ID_CHARS`` characters (the HTTP layer refuses longer ones), and the join holds at
most ``max_entries`` entries and ``max_bytes`` bytes, evicting the oldest first. A model's
entries belong to one policy revision: a new revision frees the old one's entries at once
(feedback for them is refused anyway). Evictions are counted by reason.

With a shared store the join also says which assignments still have to reach it (``unsent``):
they are the newest entries, so nothing grows beside the join while the store is away.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from router.state.store import Assignment

MAX_ID_CHARS = 400
# Bytes an entry holds besides its id string: the entry tuple, its floats and ints and the
# OrderedDict's node and slot (tracemalloc, 200,000 entries, CPython 3.11: 227 per entry).
ENTRY_BYTES = 232
# Why entries left before their time: the entry cap, the byte cap, a policy change.
EVICTION_REASONS = ("entries", "bytes", "policy")

# A str's own bytes (sys.getsizeof) without the call for an ASCII one: CPython's compact ASCII
# string is a 48-byte header, its characters and a NUL (checked in test_feedback.py).
_ASCII_STR_BYTES = sys.getsizeof("")


def id_bytes(request_id: str) -> int:
    return len(request_id) + _ASCII_STR_BYTES if request_id.isascii() else sys.getsizeof(request_id)


# id -> (expiry, version, propensity, sequence number, reward taken or None)
Entry = tuple[float, str, float, int, float | None]


@dataclass(slots=True)
class _Segment:
    """A model's entries under one policy revision, oldest first."""

    revision: int
    entries: OrderedDict[str, Entry] = field(default_factory=OrderedDict)
    bytes: int = 0
    sent: int = 0  # entries up to this sequence number have reached the shared store


class FeedbackJoin:
    """Owned by one event loop thread, as the route table is: no locks."""

    def __init__(self, ttl_s: float, max_entries: int, max_bytes: int) -> None:
        self._ttl = ttl_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._segments: dict[str, _Segment] = {}
        self._sequence = 0
        self.entries = 0
        self.bytes = 0
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)

    def add(
        self, model: str, revision: int, request_id: str, version: str, propensity: float
    ) -> None:
        """Remember that ``version`` served ``request_id`` under ``revision`` with
        ``propensity``; an id served again keeps the reward it took. The request path calls this."""
        segment = self._segments.get(model)
        if segment is None or segment.revision != revision:
            if segment is not None and segment.revision > revision:
                return  # served under a revision that was replaced while it ran
            segment = self._replace(model, revision)
        entries = segment.entries
        self._sequence = sequence = self._sequence + 1
        expiry = time.monotonic() + self._ttl
        old = entries.get(request_id)
        if old is not None:  # to the newest place, keeping the reward it took
            del entries[request_id]
            entries[request_id] = (expiry, version, propensity, sequence, old[4])
            return
        entries[request_id] = (expiry, version, propensity, sequence, None)
        size = id_bytes(request_id) + ENTRY_BYTES
        segment.bytes += size
        self.bytes += size
        self.entries += 1
        if self.entries > self._max_entries or self.bytes > self._max_bytes:
            self._shrink()

    def find(self, model: str, request_id: str) -> tuple[Assignment, float | None] | None:
        """What served ``request_id`` and the reward it took (None: none yet), while joinable."""
        segment = self._segments.get(model)
        entry = None if segment is None else segment.entries.get(request_id)
        if segment is None or entry is None or entry[0] <= time.monotonic():
            return None
        return Assignment(model, entry[1], segment.revision, entry[2]), entry[4]

    def settle(self, model: str, request_id: str, reward: float) -> None:
        """Record the reward ``request_id`` took, if the join still holds it."""
        segment = self._segments.get(model)
        entry = None if segment is None else segment.entries.get(request_id)
        if segment is not None and entry is not None:
            segment.entries[request_id] = (*entry[:4], reward)

    def retire(self, model: str, revision: int | None) -> None:
        """The model's policy is now at ``revision`` (None: deleted): free older entries."""
        segment = self._segments.get(model)
        if segment is not None and segment.revision != revision:
            if revision is None:
                self._drop(model)
            else:
                self._replace(model, revision)

    def expire(self) -> None:
        """Drop entries past the feedback window (not counted as evictions)."""
        now = time.monotonic()
        for segment in self._segments.values():
            entries = segment.entries
            while entries:
                if next(iter(entries.values()))[0] > now:
                    break
                self._pop_oldest(segment)

    def unsent(self) -> tuple[dict[str, Assignment], int]:
        """The assignments not yet handed to the shared store, and the mark to pass to
        ``sent`` once the store has them."""
        out: dict[str, Assignment] = {}
        for model, segment in self._segments.items():
            for request_id in reversed(segment.entries):
                _, version, p, sequence, _ = segment.entries[request_id]
                if sequence <= segment.sent:
                    break
                out[request_id] = Assignment(model, version, segment.revision, p)
        return out, self._sequence

    def sent(self, mark: int) -> None:
        for segment in self._segments.values():
            segment.sent = max(segment.sent, mark)

    # -- internals ------------------------------------------------------------------------------
    def _replace(self, model: str, revision: int) -> _Segment:
        self._drop(model)
        segment = self._segments[model] = _Segment(revision, sent=self._sequence)
        return segment

    def _drop(self, model: str) -> None:
        segment = self._segments.pop(model, None)
        if segment is not None:
            self.entries -= len(segment.entries)
            self.bytes -= segment.bytes
            self.evictions["policy"] += len(segment.entries)

    def _shrink(self) -> None:
        while self.entries > self._max_entries:
            self._evict("entries")
        while self.bytes > self._max_bytes:
            self._evict("bytes")

    def _evict(self, reason: str) -> None:
        # the segment whose oldest entry is oldest (one per model with a feedback policy)
        segments = self._segments
        if len(segments) == 1:  # the usual case, and one eviction per request at the cap
            segment = next(iter(segments.values()))
        else:
            segment = min(
                (s for s in segments.values() if s.entries),
                key=lambda s: next(iter(s.entries.values()))[0],
            )
        self._pop_oldest(segment)
        self.evictions[reason] += 1

    def _pop_oldest(self, segment: _Segment) -> None:
        request_id, _ = segment.entries.popitem(last=False)
        size = id_bytes(request_id) + ENTRY_BYTES
        segment.bytes -= size
        self.bytes -= size
        self.entries -= 1
