"""The state store shared by gateway replicas through Redis (redis.asyncio).

Keys, all under ``prefix``::

    revision               global revision counter
    docs / revs            hashes: model -> JSON policy document / the revision that wrote it
    audit, audit:<model>   lists of JSON audit entries, newest first, trimmed to AUDIT_CAP
    audit_seq              hash: "" (the global trail) or model -> entries ever appended to the
                           trail: the sequence number of its newest entry (audit paging cursors)
    stats:<rev>:<model>    hash: "<served|rewards|reward_sum|reward_sumsq>:<version>" -> total
    applied:<batch>        marks a stats batch as applied, with PX expiry (idempotent resends)
    assign:<request id>    JSON assignment, with PX expiry (the feedback window)
    reward:<request id>    the one reward the id took, with PX expiry (the feedback window)
    lease:<name>           the lease holder's id, with PX expiry
    members                set of processes that publish counters
    counts:<member>        hash: field -> a process's counters (opaque bytes), with PX expiry
    limits                 the rate-limits document (JSON)
    rollouts / rollout_revs      hashes: model -> JSON rollout template / the revision that wrote it
    rollout_states / rollout_seqs  hashes: model -> JSON rollout state / its sequence number
    limit:<model>:<who>    hash: a principal's token buckets and daily rows, with PX expiry
    changes                pub/sub channel: the new revision after each change

Redis errors never leave this module: every public method raises StoreUnavailable instead
(``ping`` returns False, ``watch`` retries). Client-side timeouts and no automatic retries, so a
dead Redis fails fast, and a write is never replayed after a timeout (it may have applied).

A command that timed out is not lost: a hung Redis runs it when it resumes. Writes whose caller
was told "failed" must therefore refuse to run late, or be safe to run twice:

- ``put_route`` and the rollout writes carry a deadline (the caller's clock + the command
  timeout) that the script checks against Redis's TIME before changing anything: an admin who
  got a 503 changed nothing.
  This needs the replicas' clocks within the command timeout of Redis's (NTP does far better).
- ``add_stats`` carries a batch id; the script applies a batch only if it can SET its marker
  (NX), so the caller resends an in-doubt batch with the same id and it counts once.
- ``claim`` takes a reward and adds it to the totals in one script, only if the id has none:
  an in-doubt claim that runs late is answered as the id's reward when the caller retries.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.policy.limits import DAY_S, Refusal, Rule
from router.state.store import (
    AUDIT_CAP,
    AUDIT_PAGE_BYTES,
    BATCH_MEMORY_S,
    LIMITS_AUDIT,
    ArmStats,
    Assignment,
    AuditEntry,
    AuditNote,
    AuditPage,
    RolloutCopy,
    RouteRecord,
    StaleRevision,
    StoreUnavailable,
    audit_body,
    decode_assignment,
    decode_entry,
    encode_assignment,
    page_of,
)

# The hashes of rollout templates and states, in the order RESTORE takes them.
ROLLOUT_HASHES = ("rollouts", "rollout_revs", "rollout_states", "rollout_seqs")
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.5
POOL_WAIT_S = 10.0

# Appends an audit entry to a trail and counts it in audit_seq (a trail written before the
# count existed starts from its length).
APPEND_AUDIT = """
local function append_audit(list, seqs, field, entry, cap)
  if redis.call('HEXISTS', seqs, field) == 0 then
    redis.call('HSET', seqs, field, redis.call('LLEN', list))
  end
  redis.call('HINCRBY', seqs, field, 1)
  redis.call('LPUSH', list, entry)
  redis.call('LTRIM', list, 0, cap - 1)
end
"""

# One script, so writers in many processes never interleave between the If-Match check and the
# audit append. JSON is spliced as strings: cjson would round floats and turn [] into {}.
# KEYS: revision, docs, revs, audit, audit:<model>, audit_seq
# ARGV: model, expected ("" = unconditional), doc JSON ("" = delete), audit body JSON, cap, channel,
#       not-after (Unix time in µs). Returns {1, revision}, {0, current} on a mismatch, {2, 0} late.
PUT_ROUTE = (
    APPEND_AUDIT
    + """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[7]) then
  return {2, 0}
end
local current = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= current then
  return {0, current}
end
local before = redis.call('HGET', KEYS[2], ARGV[1]) or 'null'
local revision = redis.call('INCR', KEYS[1])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[1], revision)
end
local entry = '{"revision":' .. revision .. ',"at":' .. now[1] .. '.'
  .. string.format('%06d', tonumber(now[2])) .. ',"before":' .. before .. ','
  .. string.sub(ARGV[4], 2)
append_audit(KEYS[4], KEYS[6], '', entry, tonumber(ARGV[5]))
append_audit(KEYS[5], KEYS[6], ARGV[1], entry, tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[6], revision)
return {1, revision}
"""
)

# KEYS: applied:<batch>, then the stats hashes
# ARGV: marker ttl in ms, then per increment: index into KEYS, field, 'i' (integer) or 'f', amount
ADD_STATS = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
for i = 2, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  if ARGV[i + 2] == 'i' then
    redis.call('HINCRBY', key, ARGV[i + 1], ARGV[i + 3])
  else
    redis.call('HINCRBYFLOAT', key, ARGV[i + 1], ARGV[i + 3])
  end
end
return 1
"""

# KEYS: revision, docs, revs, audit, audit_seq, then audit:<model> per record, then
#       stats:<rev>:<model> per record, then rollouts, rollout_revs, rollout_states, rollout_seqs
# ARGV: revision, channel, cap, record count n, then per record: model, revision, doc JSON, audit
#       body JSON, increment count k, then k times: field, 'i' (integer) or 'f', amount; then
#       the template count and per template: model, revision, JSON; then the state count and
#       per state: model, sequence number, JSON.
# Returns 1 if it restored, 0 if the store's revision was not below ARGV[1].
RESTORE = (
    APPEND_AUDIT
    + """
local target = tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[1]) or '0') >= target then
  return 0
end
redis.call('SET', KEYS[1], target)
local now = redis.call('TIME')
local at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
local n = tonumber(ARGV[4])
local a = 5
for i = 1, n do
  local k = tonumber(ARGV[a + 4])
  if redis.call('HEXISTS', KEYS[2], ARGV[a]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 2])
    redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 1])
    local entry = '{"revision":' .. ARGV[a + 1] .. ',"at":' .. at .. ',"before":null,'
      .. string.sub(ARGV[a + 3], 2)
    append_audit(KEYS[4], KEYS[5], '', entry, tonumber(ARGV[3]))
    append_audit(KEYS[5 + i], KEYS[5], ARGV[a], entry, tonumber(ARGV[3]))
    for f = a + 5, a + 2 + 3 * k, 3 do
      if ARGV[f + 1] == 'i' then
        redis.call('HINCRBY', KEYS[5 + n + i], ARGV[f], ARGV[f + 2])
      else
        redis.call('HINCRBYFLOAT', KEYS[5 + n + i], ARGV[f], ARGV[f + 2])
      end
    end
  end
  a = a + 5 + 3 * k
end
for pair = 0, 1 do  -- templates (rollouts, rollout_revs), then states (rollout_states, _seqs)
  local docs, numbers = KEYS[6 + 2 * n + 2 * pair], KEYS[7 + 2 * n + 2 * pair]
  local m = tonumber(ARGV[a])
  for i = 1, m do
    if redis.call('HEXISTS', docs, ARGV[a + 1]) == 0 then
      redis.call('HSET', docs, ARGV[a + 1], ARGV[a + 3])
      redis.call('HSET', numbers, ARGV[a + 1], ARGV[a + 2])
    end
    a = a + 3
  end
  a = a + 1
end
redis.call('PUBLISH', ARGV[2], target)
return 1
"""
)

# A page of a trail and where it stands, read in one step.
# KEYS: audit or audit:<model>, audit_seq; ARGV: the trail's field in audit_seq, cursor ('' =
# the newest entry), limit. Returns {entries ever appended, length, start index, the entries
# joined by newlines}: one string parses in microseconds where a thousand took the client
# ~5 ms of the event loop, and JSON from orjson (or spliced from it) holds no raw newline.
AUDIT_PAGE = """
local length = redis.call('LLEN', KEYS[1])
local total = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or length)
local start = 0
if ARGV[2] ~= '' then
  start = math.max(0, total - tonumber(ARGV[2]))
end
local entries = {}
if tonumber(ARGV[3]) > 0 then
  entries = redis.call('LRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1)
end
return {total, length, start, table.concat(entries, '\\n')}
"""

# KEYS: reward:<request id>, stats:<rev>:<model>
# ARGV: reward, its square, ttl in ms, version. Returns the id's reward if it has one, else nil.
CLAIM = """
local taken = redis.call('GET', KEYS[1])
if taken then
  return taken
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'rewards:' .. ARGV[4], 1)
redis.call('HINCRBYFLOAT', KEYS[2], 'reward_sum:' .. ARGV[4], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[2], 'reward_sumsq:' .. ARGV[4], ARGV[2])
return false
"""

# KEYS: lease:<name>; ARGV: holder, ttl in ms. Take a free lease or extend one's own.
ACQUIRE_LEASE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


# KEYS: revision, limits, audit, audit:_limits, audit_seq
# ARGV: document, audit body, audit cap, the limits trail's field in audit_seq
PUT_LIMITS = (
    APPEND_AUDIT
    + """
local now = redis.call('TIME')
local before = redis.call('GET', KEYS[2]) or 'null'
local revision = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
local entry = '{"revision":' .. revision .. ',"at":' .. now[1] .. '.'
  .. string.format('%06d', tonumber(now[2])) .. ',"before":' .. before .. ','
  .. string.sub(ARGV[2], 2)
append_audit(KEYS[3], KEYS[5], '', entry, tonumber(ARGV[3]))
append_audit(KEYS[4], KEYS[5], ARGV[4], entry, tonumber(ARGV[3]))
return revision
"""
)

# KEYS: limit:<model>:<principal>. ARGV: requests/s, burst, rows/s, rows burst, rows per day
# ('' = unlimited), rows of this request, key TTL in ms. The same all-or-nothing check as
# router.policy.limits.LocalLimiter, on Redis's clock: returns {'', ...} when taken, else
# {'requests'|'rows'|'day', seconds to wait (-1: never), what is left}.
TAKE_LIMITS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local day = math.floor(now / 86400)
local h = redis.call('HMGET', KEYS[1], 'rt', 'ra', 'wt', 'wa', 'day', 'used')
local rows = tonumber(ARGV[6])
local function fill(tokens, at, rate, cap)
  if not tokens then return cap end
  return math.min(cap, tonumber(tokens) + math.max(0, now - tonumber(at)) * rate)
end
local rt, wt
if ARGV[1] ~= '' then
  local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
  rt = fill(h[1], h[2], rate, cap)
  if rt < 1 then
    return {'requests', tostring((1 - rt) / rate), tostring(math.floor(rt))}
  end
end
if ARGV[3] ~= '' then
  local rate, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
  wt = fill(h[3], h[4], rate, cap)
  if rows > cap then return {'rows', '-1', tostring(math.floor(wt))} end
  if wt < rows then
    return {'rows', tostring((rows - wt) / rate), tostring(math.floor(wt))}
  end
end
local used = 0
if h[5] and tonumber(h[5]) == day then used = tonumber(h[6]) end
if ARGV[5] ~= '' and used + rows > tonumber(ARGV[5]) then
  return {'day', tostring((day + 1) * 86400 - now), tostring(tonumber(ARGV[5]) - used)}
end
if rt then redis.call('HSET', KEYS[1], 'rt', tostring(rt - 1), 'ra', tostring(now)) end
if wt then redis.call('HSET', KEYS[1], 'wt', tostring(wt - rows), 'wa', tostring(now)) end
redis.call('HSET', KEYS[1], 'day', day, 'used', used + rows)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {'', '0', '0'}
"""


# KEYS: rollout_states, rollout_seqs, revision, audit, audit:<model>, audit_seq
# ARGV: model, expected sequence number, state JSON, not-after (Unix time in µs), audit body JSON
#       ("" = no entry), cap. Returns {1, sequence}, {0, current} on a mismatch, {2, 0} late.
PUT_ROLLOUT_STATE = (
    APPEND_AUDIT
    + """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[4]) then
  return {2, 0}
end
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) ~= current then
  return {0, current}
end
local seq = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[5] ~= '' then
  local revision = redis.call('INCR', KEYS[3])
  local entry = '{"revision":' .. revision .. ',"at":' .. now[1] .. '.'
    .. string.format('%06d', tonumber(now[2])) .. ',"before":null,' .. string.sub(ARGV[5], 2)
  append_audit(KEYS[4], KEYS[6], '', entry, tonumber(ARGV[6]))
  append_audit(KEYS[5], KEYS[6], ARGV[1], entry, tonumber(ARGV[6]))
end
return {1, seq}
"""
)


def _increments(version: str, totals: ArmStats) -> list[tuple[str, str, str]]:
    """(field, 'i' or 'f', amount) of each nonzero total, as the scripts read them (an all-zero
    delta creates no entry)."""
    parts: list[tuple[str, str, str]] = []
    for stat, kind, amount in (
        ("served", "i", totals.served),
        ("rewards", "i", totals.rewards),
        ("reward_sum", "f", totals.reward_sum),
        ("reward_sumsq", "f", totals.reward_sumsq),
    ):
        if amount:
            parts.append((f"{stat}:{version}", kind, repr(amount)))
    return parts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def connect(url: str, timeout_s: float, max_connections: int) -> Redis:
    """A client on its own pool: client-side timeouts, no automatic retries (a write is never
    replayed after a timeout), and callers beyond ``max_connections`` queue for a connection
    instead of failing at once; the wait is bounded, but longer than a command's timeout: a
    burst is not an outage."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str = "turnout:",
        reconcile_s: float = 1.0,
        timeout_s: float = 1.0,
        max_connections: int = 32,
    ) -> None:
        self._redis = connect(url, timeout_s, max_connections)
        self._prefix = prefix
        self._reconcile_s = reconcile_s
        self._timeout_s = timeout_s
        self._put = self._redis.register_script(PUT_ROUTE)
        self._add = self._redis.register_script(ADD_STATS)
        self._lease = self._redis.register_script(ACQUIRE_LEASE)
        self._restore = self._redis.register_script(RESTORE)
        self._page = self._redis.register_script(AUDIT_PAGE)
        self._claim = self._redis.register_script(CLAIM)
        self._put_limits = self._redis.register_script(PUT_LIMITS)
        self._take = self._redis.register_script(TAKE_LIMITS)
        self._put_rollout_state = self._redis.register_script(PUT_ROLLOUT_STATE)
        self._closed = False

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def routes(self) -> tuple[int, dict[str, RouteRecord]]:
        with _translated():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._key("revision"))
                pipe.hgetall(self._key("docs"))
                pipe.hgetall(self._key("revs"))
                raw_revision, docs, revs = await pipe.execute()
        records: dict[str, RouteRecord] = {}
        for raw_model, doc in docs.items():
            model = raw_model.decode()
            records[model] = RouteRecord(model, orjson.loads(doc), int(revs[raw_model]))
        return int(raw_revision or 0), records

    async def revision(self) -> int:
        with _translated():
            raw = await self._redis.get(self._key("revision"))
        return int(raw or 0)

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
        after = None if doc is None else orjson.dumps(doc)
        body = audit_body(who, model, action, reason, after, artifacts, details)
        revision = await self._put_doc("docs", "revs", model, after, body, expected)
        return None if after is None else RouteRecord(model, orjson.loads(after), int(revision))

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
        key = self._key("audit") if model is None else self._key("audit", model)
        keys = [key, self._key("audit_seq")]
        args = [model or "", "" if cursor is None else cursor, max(limit, 0)]
        with _translated():
            total, length, start, joined = await self._page(keys=keys, args=args)
        raw = joined.split(b"\n") if joined else []
        return page_of(raw, int(total), int(length), int(start), max_bytes)

    async def add_stats(self, deltas: Mapping[tuple[str, int, str], ArmStats], batch: str) -> None:
        keys = [self._key("applied", batch)]
        args: list[str | int] = [max(1, round(BATCH_MEMORY_S * 1000))]
        for (model, revision, version), delta in deltas.items():
            keys.append(self._key("stats", str(revision), model))
            index = len(keys)  # Lua counts from 1
            for field, kind, amount in _increments(version, delta):
                args += [index, field, kind, amount]
        with _translated():
            await self._add(keys=keys, args=args)

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
        keys = [self._key(k) for k in ("revision", "docs", "revs", "audit", "audit_seq")]
        keys += [self._key("audit", r.model) for r in records]
        keys += [self._key("stats", str(r.revision), r.model) for r in records]
        keys += [self._key(k) for k in ROLLOUT_HASHES]
        args: list[bytes | str | int] = [revision, self._key("changes"), AUDIT_CAP, len(records)]
        for r in records:
            doc = orjson.dumps(r.doc)
            body = audit_body(who, r.model, "restore", reason, doc, {}, None)
            fields = [
                inc
                for v, totals in stats.get(r.model, {}).items()
                for inc in _increments(v, totals)
            ]
            args += [r.model, r.revision, doc, body, len(fields)]
            args += [part for inc in fields for part in inc]
        copy = rollouts or RolloutCopy()
        for held in (copy.templates, copy.states):
            args.append(len(held))
            for model, (number, doc_or_state) in held.items():
                args += [model, number, orjson.dumps(doc_or_state)]
        with _translated():
            return bool(await self._restore(keys=keys, args=args))

    async def stats(self, model: str, revision: int) -> dict[str, ArmStats]:
        with _translated():
            raw = await self._redis.hgetall(self._key("stats", str(revision), model))
        totals: dict[str, dict[str, bytes | str]] = {}
        for name, value in raw.items():
            stat, _, version = _text(name).partition(":")
            totals.setdefault(version, {})[stat] = value
        return {
            version: ArmStats(
                int(t.get("served", 0)),
                int(t.get("rewards", 0)),
                float(t.get("reward_sum", 0.0)),
                float(t.get("reward_sumsq", 0.0)),
            )
            for version, t in totals.items()
        }

    async def remember(self, assignments: Mapping[str, Assignment], ttl_s: float) -> None:
        ttl_ms = max(1, round(ttl_s * 1000))
        with _translated():
            async with self._redis.pipeline(transaction=False) as pipe:
                for request_id, assignment in assignments.items():
                    pipe.set(
                        self._key("assign", request_id), encode_assignment(assignment), px=ttl_ms
                    )
                await pipe.execute()

    async def recall(self, request_id: str) -> Assignment | None:
        with _translated():
            raw = await self._redis.get(self._key("assign", request_id))
        return None if raw is None else decode_assignment(raw)

    async def claim(
        self, request_id: str, assignment: Assignment, reward: float, ttl_s: float
    ) -> float | None:
        keys = [
            self._key("reward", request_id),
            self._key("stats", str(assignment.revision), assignment.model),
        ]
        ttl_ms = max(1, round(ttl_s * 1000))
        args: list[str | int] = [repr(reward), repr(reward * reward), ttl_ms, assignment.version]
        with _translated():
            taken = await self._claim(keys=keys, args=args)
        return None if taken is None else float(taken)

    async def watch(self) -> AsyncIterator[int]:
        """Pub/sub wakes the watcher; the revision is always read back, and read anyway every
        ``reconcile_s``, so a lost message delays a change by at most that long."""
        backoff = BACKOFF_MIN_S
        while not self._closed:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._key("changes"))
                    last = await self.revision()
                    backoff = BACKOFF_MIN_S
                    yield last  # on every (re)connection: changes may have been missed meanwhile
                    while not self._closed:
                        await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=self._reconcile_s
                        )
                        current = await self.revision()
                        if current != last:
                            last = current
                            yield current
            except (RedisError, StoreUnavailable):
                if not self._closed:
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        ttl_ms = max(1, round(ttl_s * 1000))
        with _translated():
            taken = await self._lease(keys=[self._key("lease", name)], args=[holder, ttl_ms])
        return bool(taken)

    async def publish_counts(self, member: str, blobs: Mapping[str, bytes], ttl_s: float) -> None:
        key = self._key("counts", member)
        with _translated():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if blobs:
                    pipe.hset(key, items=[part for pair in blobs.items() for part in pair])
                    pipe.pexpire(key, max(1, round(ttl_s * 1000)))
                pipe.sadd(self._key("members"), member)
                await pipe.execute()

    async def read_counts(
        self, prefix: str = "", fields: Sequence[str] | None = None
    ) -> dict[str, dict[str, bytes]]:
        with _translated():
            members = sorted(_text(m) for m in await self._redis.smembers(self._key("members")))
            members = [m for m in members if m.startswith(prefix)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in members:
                    if fields is None:
                        pipe.hgetall(self._key("counts", member))
                    else:
                        pipe.hmget(self._key("counts", member), list(fields))
                found = await pipe.execute()
            if fields is not None:  # a member without them may be alive: nothing to forget
                found = [
                    {f: v for f, v in zip(fields, values, strict=True) if v is not None}
                    for values in found
                ]
            else:
                gone = [m for m, blobs in zip(members, found, strict=True) if not blobs]
                if gone:  # expired: forget the member too
                    await self._redis.srem(self._key("members"), *gone)
        return {
            m: {_text(k): bytes(v) for k, v in blobs.items()}
            for m, blobs in zip(members, found, strict=True)
            if blobs
        }

    async def put_limits(self, doc: dict[str, Any], *, who: str, reason: str) -> int:
        after = orjson.dumps(doc)
        body = audit_body(who, LIMITS_AUDIT, "limits", reason, after, {}, None)
        keys = [
            self._key("revision"),
            self._key("limits"),
            self._key("audit"),
            self._key("audit", LIMITS_AUDIT),
            self._key("audit_seq"),
        ]
        args: list[bytes | str | int] = [after, body, AUDIT_CAP, LIMITS_AUDIT]
        with _translated():
            return int(await self._put_limits(keys=keys, args=args))

    async def limits(self) -> dict[str, Any] | None:
        with _translated():
            raw = await self._redis.get(self._key("limits"))
        return None if raw is None else dict(orjson.loads(raw))

    async def take_limits(
        self, principal: str, model: str, rule: Rule, rows: int
    ) -> Refusal | None:
        """``LocalLimiter.take`` for the whole fleet: one script, one round trip."""
        ttl_s = 2.0 * DAY_S if rule.rows_per_day is not None else 1.0
        if rule.requests_per_s is not None:
            ttl_s = max(ttl_s, rule.request_burst / rule.requests_per_s + 1.0)
        if rule.rows_per_s is not None:
            ttl_s = max(ttl_s, rule.row_burst / rule.rows_per_s + 1.0)
        args = [
            "" if rule.requests_per_s is None else repr(rule.requests_per_s),
            "" if rule.requests_per_s is None else rule.request_burst,
            "" if rule.rows_per_s is None else repr(rule.rows_per_s),
            "" if rule.rows_per_s is None else rule.row_burst,
            "" if rule.rows_per_day is None else rule.rows_per_day,
            rows,
            round(min(ttl_s, 3.0 * DAY_S) * 1000),
        ]
        with _translated():
            which, wait, left = await self._take(
                keys=[self._key("limit", model, principal)], args=args
            )
        if not which:
            return None
        wait_s = float(wait)
        return Refusal(_text(which), math.inf if wait_s < 0 else wait_s, int(float(left)))

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
        after = None if doc is None else orjson.dumps(doc)
        body = audit_body(who, model, action, reason, after, {}, None)
        return await self._put_doc("rollouts", "rollout_revs", model, after, body, expected)

    async def _put_doc(
        self,
        docs: str,
        revs: str,
        model: str,
        after: bytes | None,
        body: bytes,
        expected: int | None,
    ) -> int:
        """PUT_ROUTE on the hashes ``docs`` and ``revs``: policies, or rollout templates."""
        keys = [
            self._key("revision"),
            self._key(docs),
            self._key(revs),
            self._key("audit"),
            self._key("audit", model),
            self._key("audit_seq"),
        ]
        args: list[bytes | str | int] = [
            model, "" if expected is None else str(expected), after or b"", body, AUDIT_CAP,
            self._key("changes"), self._deadline(),
        ]  # fmt: skip
        with _translated():
            applied, revision = await self._put(keys=keys, args=args)
        return self._applied(model, expected, applied, revision)

    async def rollouts(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return await self._read_pairs("rollouts", "rollout_revs")

    async def put_rollout_state(
        self, model: str, state: dict[str, Any], *, expected: int, note: AuditNote | None = None
    ) -> int:
        body = b""
        if note is not None:
            body = audit_body(note.who, model, note.action, note.reason, None, {}, note.details)
        keys = [
            self._key("rollout_states"),
            self._key("rollout_seqs"),
            self._key("revision"),
            self._key("audit"),
            self._key("audit", model),
            self._key("audit_seq"),
        ]
        args: list[bytes | str | int] = [
            model, expected, orjson.dumps(state), self._deadline(), body, AUDIT_CAP,
        ]  # fmt: skip
        with _translated():
            applied, seq = await self._put_rollout_state(keys=keys, args=args)
        return self._applied(model, expected, applied, seq)

    async def rollout_states(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return await self._read_pairs("rollout_states", "rollout_seqs")

    def _deadline(self) -> int:
        """A script's not-after time: the caller hears "failed" once its timeout passes, so
        after that the script changes nothing."""
        return round((time.time() + self._timeout_s) * 1e6)

    def _applied(self, model: str, expected: int | None, applied: int, number: int) -> int:
        if applied == 2:
            raise StoreUnavailable(
                "redis ran the change after its deadline (it was hung, or clocks differ by more "
                f"than {self._timeout_s} s); nothing was changed"
            )
        if not applied:
            assert expected is not None  # the scripts refuse only on an If-Match mismatch
            raise StaleRevision(model, expected, int(number))
        return int(number)

    async def _read_pairs(self, docs: str, numbers: str) -> dict[str, tuple[int, dict[str, Any]]]:
        with _translated():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key(docs))
                pipe.hgetall(self._key(numbers))
                found, revs = await pipe.execute()
        return {
            _text(m): (int(revs.get(m, 0)), dict(orjson.loads(doc))) for m, doc in found.items()
        }

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        self._closed = True
        await self._redis.aclose()
