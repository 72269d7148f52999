"""The event outbox: events waiting for delivery to the sinks (gateway.background.events), and
the recent ones people list (``GET /admin/events``).

Entries are numbered 1, 2, ... as they are appended (``seq``); each sink has a cursor, the seq
of the last entry it has passed (delivered, filtered out or skipped as poison). An entry no sink
still needs is *delivered*. The outbox holds at most ``max_events`` entries and ``max_bytes``
bytes: an append first evicts delivered entries, oldest first, and when the outbox is full of
undelivered entries it refuses the new one (the caller counts the drop). So it keeps the recent
history for people as long as there is room, and never loses an undelivered event to make room.

Three implementations share these semantics: ``MemoryOutbox`` (the process's memory: lost on
restart), ``FileOutbox`` (an append-only file under a directory: survives a restart, rewritten
without its delivered entries when they are more than half of it) and
``router.state.redis_outbox.RedisOutbox`` (a Redis stream: survives a restart and is shared by
the fleet). Each also keeps the per-sink delivery leases and small named state blobs (the drift
watcher's last statuses), so that whoever takes over resumes where the other stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from router.state.store import take_lease

log = logging.getLogger("turnout.outbox")

BATCH_MEMORY = 1000  # recent append batches remembered (resent batches count once)
SCAN_CAP = 10_000  # entries one listing page looks at, at most (a rare kind stops a page early)


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    at: float  # unix seconds when appended
    kind: str
    body: bytes  # the CloudEvent, JSON


@dataclass(frozen=True, slots=True)
class Backlog:
    """What one sink has not passed yet: how many entries and when the oldest was appended."""

    depth: int
    oldest_at: float | None


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]  # newest first
    next: int | None  # the cursor of the next (older) page; None: no more


class OutboxUnavailable(Exception):
    """The backend cannot be reached; nothing was changed (or the change is in doubt)."""


class Outbox(Protocol):
    async def register(self, sinks: Sequence[str]) -> None:
        """Give each sink without a cursor one at the current head (a new sink starts with the
        events emitted from now on) and remember ``sinks`` as the ones whose cursors hold
        entries back from eviction."""
        ...

    async def append(self, items: Sequence[tuple[str, bytes]], batch: str) -> int:
        """Append (kind, body) items in order; the number taken (a prefix of ``items``): the
        rest did not fit (the outbox is full of undelivered entries). ``batch`` names the items:
        sent again after a failure that left it in doubt, the same batch is appended once."""
        ...

    async def read(self, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with seq > ``after``, oldest first."""
        ...

    async def cursor(self, sink: str) -> int: ...

    async def advance(self, sink: str, seq: int, holder: str) -> bool:
        """Move ``sink``'s cursor forward to ``seq`` unless another holder than ``holder`` holds
        its lease (``sink``'s name): False, changing nothing, then. A lease that lapsed without
        being taken (a stalled loop) still lets its holder record what it delivered. A cursor
        never moves back."""
        ...

    async def backlog(self, sink: str) -> Backlog: ...

    async def page(self, before: int | None, limit: int, kinds: frozenset[str] | None) -> Page:
        """Up to ``limit`` entries with seq < ``before`` (None: from the newest), newest first,
        of ``kinds`` (None: all); looks at SCAN_CAP entries at most."""
        ...

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """As ``StateStore.acquire_lease``."""
        ...

    async def load_state(self, name: str) -> bytes | None: ...

    async def save_state(self, name: str, blob: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryOutbox:
    """The outbox in this process's memory. No method awaits, so each is atomic on the loop."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._head = 0  # seq of the last entry appended
        self._cursors: dict[str, int] = {}
        self._sinks: tuple[str, ...] = ()
        self._leases: dict[str, tuple[str, float]] = {}
        self._state: dict[str, bytes] = {}
        self._batches: OrderedDict[str, int] = OrderedDict()  # recent batch -> number taken

    # -- the semantics, shared with FileOutbox ----------------------------------------------
    async def register(self, sinks: Sequence[str]) -> None:
        for sink in sinks:
            self._cursors.setdefault(sink, self._head)
        self._sinks = tuple(sinks)
        self._saved()

    def _delivered(self) -> int:
        """The seq up to which every registered sink has passed."""
        return min((self._cursors.get(s, 0) for s in self._sinks), default=self._head)

    async def append(self, items: Sequence[tuple[str, bytes]], batch: str = "") -> int:
        if batch in self._batches:
            return self._batches[batch]
        taken: list[Entry] = []
        delivered = self._delivered()
        now = time.time()
        for kind, body in items:
            size = len(body)
            while self._entries and (
                len(self._entries) >= self.max_events or self._bytes + size > self.max_bytes
            ):
                if self._entries[0].seq > delivered:
                    break
                self._bytes -= len(self._entries.popleft().body)
            if len(self._entries) >= self.max_events or self._bytes + size > self.max_bytes:
                break
            self._head += 1
            entry = Entry(self._head, now, kind, body)
            self._entries.append(entry)
            self._bytes += size
            taken.append(entry)
        if taken:
            self._appended(taken)
        if batch:
            self._batches[batch] = len(taken)
            while len(self._batches) > BATCH_MEMORY:
                self._batches.popitem(last=False)
        return len(taken)

    async def read(self, after: int, limit: int) -> list[Entry]:
        out: list[Entry] = []
        if not self._entries:
            return out
        start = max(0, after + 1 - self._entries[0].seq)
        for i in range(start, min(len(self._entries), start + limit)):
            out.append(self._entries[i])
        return out

    async def cursor(self, sink: str) -> int:
        return self._cursors.get(sink, self._head)

    async def advance(self, sink: str, seq: int, holder: str) -> bool:
        lease = self._leases.get(sink)
        if lease is not None and lease[0] != holder and lease[1] > time.monotonic():
            return False
        if seq > self._cursors.get(sink, 0):
            self._cursors[sink] = seq
            self._saved()
        return True

    async def backlog(self, sink: str) -> Backlog:
        cursor = self._cursors.get(sink, self._head)
        pending = await self.read(cursor, 1)
        return Backlog(self._head - cursor, pending[0].at if pending else None)

    async def page(self, before: int | None, limit: int, kinds: frozenset[str] | None) -> Page:
        out: list[Entry] = []
        scanned = 0
        index = len(self._entries) - 1
        if before is not None and self._entries:
            index = min(index, before - 1 - self._entries[0].seq)
        while index >= 0 and len(out) < limit and scanned < SCAN_CAP:
            entry = self._entries[index]
            if kinds is None or entry.kind in kinds:
                out.append(entry)
            scanned += 1
            index -= 1
        following = self._entries[index + 1].seq if index >= 0 else None
        return Page(out, following)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return take_lease(self._leases, name, holder, ttl_s)

    async def load_state(self, name: str) -> bytes | None:
        return self._state.get(name)

    async def save_state(self, name: str, blob: bytes) -> None:
        self._state[name] = blob
        self._saved()

    async def close(self) -> None:
        return None

    # -- persistence hooks (FileOutbox) -------------------------------------------------------
    def _appended(self, entries: list[Entry]) -> None:
        return None

    def _saved(self) -> None:
        return None


class FileOutbox(MemoryOutbox):
    """``MemoryOutbox`` kept in ``directory``: ``outbox.jsonl`` (one entry a line, appended and
    flushed by each append) and ``state.json`` (cursors and state blobs, replaced atomically).
    On start both are read back. The file is rewritten without its evicted entries once they are
    more than half of its lines, so it stays within about twice the outbox's bounds."""

    def __init__(self, directory: Path, max_events: int, max_bytes: int) -> None:
        super().__init__(max_events, max_bytes)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "outbox.jsonl"
        self.state_path = directory / "state.json"
        self._lines = 0
        self._load()
        self._file = self.path.open("ab")

    def _load(self) -> None:
        if self.state_path.exists():
            try:
                state = orjson.loads(self.state_path.read_bytes())
                self._cursors = {str(k): int(v) for k, v in state["cursors"].items()}
                self._state = {str(k): str(v).encode() for k, v in state["state"].items()}
                self._head = int(state["head"])
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "event outbox state %s unreadable, starting afresh: %s", self.state_path, exc
                )
        if self.path.exists():
            with self.path.open("rb") as f:
                for line in f:
                    self._lines += 1
                    try:
                        d = orjson.loads(line)
                        entry = Entry(int(d["s"]), float(d["t"]), str(d["k"]), orjson.dumps(d["e"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash: the rest is intact
                    if self._entries and entry.seq <= self._entries[-1].seq:
                        continue
                    self._entries.append(entry)
                    self._bytes += len(entry.body)
            while self._entries and (
                len(self._entries) > self.max_events or self._bytes > self.max_bytes
            ):  # the bounds were lowered since: the oldest go
                self._bytes -= len(self._entries.popleft().body)
        if self._entries:
            self._head = max(self._head, self._entries[-1].seq)

    def _appended(self, entries: list[Entry]) -> None:
        lines = b"".join(
            b'{"s":%d,"t":%r,"k":%s,"e":%s}\n' % (e.seq, e.at, orjson.dumps(e.kind), e.body)
            for e in entries
        )
        self._file.write(lines)
        self._file.flush()
        self._lines += len(entries)
        self._saved()
        if self._lines > 2 * max(len(self._entries), 64):
            self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            for e in self._entries:
                f.write(
                    b'{"s":%d,"t":%r,"k":%s,"e":%s}\n' % (e.seq, e.at, orjson.dumps(e.kind), e.body)
                )
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        os.replace(tmp, self.path)
        self._file = self.path.open("ab")
        self._lines = len(self._entries)

    def _saved(self) -> None:
        state = {
            "head": self._head,
            "cursors": self._cursors,
            "state": {k: v.decode() for k, v in self._state.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state))
        os.replace(tmp, self.state_path)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
