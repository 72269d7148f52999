"""The event outbox in Redis (router.state.outbox has the semantics), shared by the fleet.

Keys, all under ``prefix``::

    stream          a Redis stream; entry ``<seq>-1`` has fields t (unix time), k (kind), e (body)
    head            seq of the last entry appended
    bytes           bytes of the bodies in the stream
    cursors         hash: sink -> seq of the last entry it passed
    batch:<id>      the number an append of that id took, with PX expiry (idempotent resends)
    sinks           set: the sinks whose cursors hold entries back from eviction
    lease:<sink>    the delivering replica's id, with PX expiry
    state:<name>    a state blob (the drift watcher's last statuses)

The stream is also capped with ``XADD MAXLEN ~`` at twice ``max_events``, a backstop the append
script's own bound never reaches. Redis errors leave this module as OutboxUnavailable.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from redis.exceptions import RedisError

from router.state.outbox import SCAN_CAP, Backlog, Entry, OutboxUnavailable, Page
from router.state.redis_store import ACQUIRE_LEASE, connect

# KEYS: stream, head, bytes, cursors, sinks, batch:<id>. ARGV: max events, max bytes, now, batch
# marker ttl in ms, the number k of the caller's sinks, the k sinks, then kind, body pairs.
# Evicts delivered entries (oldest first) to make room; stops at the first item that does not
# fit. Returns the number of items taken; a batch already applied (its timed-out first try ran
# late) changes nothing and returns what it took then. A stream without a head was never
# appended to: new, or emptied (a Redis restarted without persistence, which also lost the
# cursors): the caller's sinks then start at its beginning, so none skips what follows.
APPEND = """
local done = redis.call('GET', KEYS[6])
if done then return tonumber(done) end
local k = tonumber(ARGV[5])
local head = redis.call('GET', KEYS[2])
if not head then
  for i = 6, 5 + k do
    redis.call('HSETNX', KEYS[4], ARGV[i], '0')
    redis.call('SADD', KEYS[5], ARGV[i])
  end
end
head = tonumber(head or '0')
local delivered = head
for _, s in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local c = tonumber(redis.call('HGET', KEYS[4], s) or tostring(head))
  if c < delivered then delivered = c end
end
local maxn, maxb = tonumber(ARGV[1]), tonumber(ARGV[2])
local bytes = tonumber(redis.call('GET', KEYS[3]) or '0')
local n = redis.call('XLEN', KEYS[1])
local taken = 0
for i = 6 + k, #ARGV, 2 do
  local size = string.len(ARGV[i + 1])
  while n > 0 and (n >= maxn or bytes + size > maxb) do
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    local seq = tonumber(string.match(oldest[1], '^(%d+)'))
    if seq > delivered then break end
    bytes = bytes - string.len(oldest[2][6])
    redis.call('XDEL', KEYS[1], oldest[1])
    n = n - 1
  end
  if n >= maxn or bytes + size > maxb then break end
  head = head + 1
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', 2 * maxn, head .. '-1',
    't', ARGV[3], 'k', ARGV[i], 'e', ARGV[i + 1])
  bytes = bytes + size
  n = n + 1
  taken = taken + 1
end
redis.call('SET', KEYS[2], head)
redis.call('SET', KEYS[3], bytes)
redis.call('SET', KEYS[6], taken, 'PX', ARGV[4])
return taken
"""

# How long an append is remembered: a batch resent after a timeout within this counts once.
BATCH_MEMORY_MS = 600_000

# KEYS: head, cursors, sinks. ARGV: sinks. A new sink starts at the head.
REGISTER = """
local head = redis.call('GET', KEYS[1]) or '0'
redis.call('DEL', KEYS[3])
for _, s in ipairs(ARGV) do
  redis.call('HSETNX', KEYS[2], s, head)
  redis.call('SADD', KEYS[3], s)
end
return 1
"""

# KEYS: lease:<sink>, cursors, head. ARGV: holder, sink, seq. Forward only, not past the head
# (a delivery read before the stream was emptied: its seq names an entry that is gone), and not
# while another replica holds the lease (a lapsed lease nobody took still lets its holder record
# its delivery).
ADVANCE = """
local current_holder = redis.call('GET', KEYS[1])
if current_holder and current_holder ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[3]) or '0') then return 1 end
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if tonumber(ARGV[3]) > current then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
return 1
"""


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise OutboxUnavailable(f"redis: {exc}") from exc


def _entry(raw: Any) -> Entry:
    ident, fields = raw
    text = ident.decode() if isinstance(ident, bytes) else ident
    return Entry(
        int(text.partition("-")[0]), float(fields[b"t"]), fields[b"k"].decode(), fields[b"e"]
    )


class RedisOutbox:
    def __init__(
        self, url: str, prefix: str, max_events: int, max_bytes: int, timeout_s: float = 1.0
    ) -> None:
        self._redis = connect(url, timeout_s, max_connections=8)
        self._prefix = prefix
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._append = self._redis.register_script(APPEND)
        self._register = self._redis.register_script(REGISTER)
        self._advance = self._redis.register_script(ADVANCE)
        self._lease = self._redis.register_script(ACQUIRE_LEASE)
        self._sinks: list[str] = []  # as registered: an emptied stream starts them again

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def register(self, sinks: Sequence[str]) -> None:
        self._sinks = list(sinks)
        with _translated():
            keys = [self._key("head"), self._key("cursors"), self._key("sinks")]
            await self._register(keys=keys, args=list(sinks))

    async def append(self, items: Sequence[tuple[str, bytes]], batch: str = "") -> int:
        if not items:
            return 0
        keys = [self._key(k) for k in ("stream", "head", "bytes", "cursors", "sinks")]
        keys.append(self._key("batch", batch or uuid.uuid4().hex))
        args: list[Any] = [self.max_events, self.max_bytes, f"{time.time():.6f}", BATCH_MEMORY_MS]
        args += [len(self._sinks), *self._sinks]
        for kind, body in items:
            args += [kind, body]
        with _translated():
            return int(await self._append(keys=keys, args=args))

    async def read(self, after: int, limit: int) -> list[Entry]:
        with _translated():
            raw = await self._redis.xrange(self._key("stream"), f"({after}-1", "+", count=limit)
        return [_entry(r) for r in raw or ()]

    async def cursor(self, sink: str) -> int:
        with _translated():
            value = await self._redis.hget(self._key("cursors"), sink)
            if value is None:
                value = await self._redis.get(self._key("head"))
        return int(value or 0)

    async def advance(self, sink: str, seq: int, holder: str) -> bool:
        with _translated():
            keys = [self._key("lease", sink), self._key("cursors"), self._key("head")]
            return bool(await self._advance(keys=keys, args=[holder, sink, seq]))

    async def backlog(self, sink: str) -> Backlog:
        cursor = await self.cursor(sink)
        with _translated():
            head = int(await self._redis.get(self._key("head")) or 0)
        pending = await self.read(cursor, 1)
        return Backlog(max(0, head - cursor), pending[0].at if pending else None)

    async def page(self, before: int | None, limit: int, kinds: frozenset[str] | None) -> Page:
        out: list[Entry] = []
        scanned = 0
        top = "+" if before is None else f"({before}-1"
        with _translated():
            while True:
                chunk = min(SCAN_CAP - scanned, max(limit - len(out), 100))
                raw = await self._redis.xrevrange(self._key("stream"), top, "-", count=chunk) or []
                for r in raw:
                    entry = _entry(r)
                    scanned += 1
                    top = f"({entry.seq}-1"
                    if kinds is None or entry.kind in kinds:
                        out.append(entry)
                    if len(out) >= limit or scanned >= SCAN_CAP:
                        older = await self._redis.xrevrange(self._key("stream"), top, "-", count=1)
                        return Page(out, entry.seq if older else None)
                if len(raw) < chunk:
                    return Page(out, None)  # the stream ran out

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with _translated():
            ttl_ms = max(1, int(ttl_s * 1000))
            return bool(await self._lease(keys=[self._key("lease", name)], args=[holder, ttl_ms]))

    async def load_state(self, name: str) -> bytes | None:
        with _translated():
            value = await self._redis.get(self._key("state", name))
        return None if value is None else value if isinstance(value, bytes) else value.encode()

    async def save_state(self, name: str, blob: bytes) -> None:
        with _translated():
            await self._redis.set(self._key("state", name), blob)

    async def close(self) -> None:
        await self._redis.aclose()
