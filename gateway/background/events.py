"""The event stream: CloudEvents 1.0 (JSON, structured mode) for everything that matters to an
operator or a pipeline, kept in an outbox and delivered, signed, to configured HTTP sinks.

``Events.emit`` (a ``gateway.serving.types.Emit``) builds the event once, with its id, and puts
it in a bounded buffer: it never blocks and never raises; a full buffer, an unknown kind or an
event over ``MAX_EVENT_BYTES`` is dropped and counted (``turnout_events_dropped_total``). A pump
task moves the buffer into the outbox (router.state.outbox: memory, a local file or a Redis
stream), which refuses events when it is full of undelivered ones (dropped, ``outbox_full``).

Each sink has a task of its own and a cursor in the outbox, so a slow or dead sink holds back
no other. With Redis one replica delivers for each sink, the holder of the sink's lease; the
cursor lives in Redis, so a replica taking over resumes where the other stopped. Each event is
POSTed until a 2xx answers (at least once: an event whose delivery was in doubt when the lease
changed hands may arrive twice, with the same id), with exponential backoff and full jitter
between attempts. A 4xx other than 408 and 429 is the sink refusing the event itself: after
``poison_attempts`` such answers it is skipped and counted (``poisoned``). docs/events.md has
the sinks file, the signature and how a receiver checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.background.tasks import holder_id, stop_task
from router.state.outbox import Entry, Outbox, OutboxUnavailable, Page

log = logging.getLogger("turnout.events")

# The lead's fixed list of event kinds (docs/events.md describes each one's subject and data).
KINDS: tuple[str, ...] = (
    "model.loaded", "model.unloaded", "model.failed",
    "policy.changed",
    "guard.breached", "guard.acted",
    "drift.changed",
    "quality.breached", "quality.recovered",
    "approval.requested", "approval.granted", "approval.rejected",
    "rollout.started", "rollout.advanced", "rollout.promoted", "rollout.rolled_back",
    "rollout.aborted",
)  # fmt: skip
TYPE_PREFIX = "dev.turnout."
CONTENT_TYPE = "application/cloudevents+json"
SIGNATURE_HEADER = "Turnout-Signature"
REPLAY_WINDOW_S = 300  # documented: receivers reject a signature older than this
DROP_REASONS = ("unknown_kind", "too_large", "unserializable", "buffer_full", "outbox_full")
OUTCOMES = ("delivered", "failed", "rejected", "poisoned")
MAX_EVENT_BYTES = 64 * 1024
MAX_SUBJECT_CHARS = 512
MAX_PENDING = 10_000  # events emitted and not yet in the outbox
MAX_PENDING_BYTES = 16 << 20
BATCH = 100  # events per outbox append or read
# The sinks file
MAX_SINKS = 32
MAX_SINKS_FILE_BYTES = 1 << 20
MAX_URL_CHARS = 2048
MAX_PATTERNS = 64
MIN_SECRET_CHARS = 16
SINK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SINK_FIELDS = {
    "name", "url", "types", "secret", "secret_env", "timeout_s", "backoff_s", "max_backoff_s",
    "poison_attempts",
}  # fmt: skip


class SinkConfigError(ValueError):
    """The sinks file is not valid; the message names the file, the sink and the field."""


@dataclass(frozen=True, slots=True)
class Sink:
    name: str
    url: str
    types: tuple[str, ...]  # glob patterns over kinds
    secret: bytes
    timeout_s: float = 5.0
    backoff_s: float = 1.0  # the first retry waits up to this; each doubles it
    max_backoff_s: float = 300.0
    poison_attempts: int = 3

    def wants(self, kind: str) -> bool:
        return any(fnmatch.fnmatchcase(kind, p) for p in self.types)


def read_sinks(path: Path, environ: Mapping[str, str] | None = None) -> list[Sink]:
    """The sinks of a JSON file (a list of objects), validated whole; SinkConfigError names the
    first problem. ``secret_env`` names a variable of ``environ`` (default: the process's)."""
    env = os.environ if environ is None else environ
    where = str(path)
    try:
        if path.stat().st_size > MAX_SINKS_FILE_BYTES:
            raise SinkConfigError(f"{where}: larger than {MAX_SINKS_FILE_BYTES} bytes")
        doc = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise SinkConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise SinkConfigError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise SinkConfigError(f"{where}: must be a JSON list of sinks")
    if len(doc) > MAX_SINKS:
        raise SinkConfigError(f"{where}: at most {MAX_SINKS} sinks (got {len(doc)})")
    sinks: list[Sink] = []
    for i, raw in enumerate(doc):
        sink = _sink(f"{where}: sink {i}", raw, env)
        if any(s.name == sink.name for s in sinks):
            raise SinkConfigError(f"{where}: sink {i}: name {sink.name!r} given twice")
        sinks.append(sink)
    return sinks


def _sink(where: str, raw: Any, env: Mapping[str, str]) -> Sink:
    if not isinstance(raw, dict):
        raise SinkConfigError(f"{where}: must be an object")
    unknown = sorted(set(raw) - SINK_FIELDS)
    if unknown:
        raise SinkConfigError(f"{where}: unknown field {unknown[0][:40]!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not SINK_NAME.fullmatch(name):
        raise SinkConfigError(
            f"{where}: name: required, 1 to 63 of a-z 0-9 _ - starting with a letter or digit"
        )
    where = f"{where} ({name})"
    url = raw.get("url")
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise SinkConfigError(f"{where}: url: required, a string of at most {MAX_URL_CHARS}")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise SinkConfigError(f"{where}: url: must be an http:// or https:// URL with a host")
    types = raw.get("types", ["*"])
    if (
        not isinstance(types, list)
        or not types
        or len(types) > MAX_PATTERNS
        or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in types)
    ):
        raise SinkConfigError(
            f"{where}: types: a non-empty list of at most {MAX_PATTERNS} patterns such as "
            '"drift.*" or "model.loaded"'
        )
    for pattern in types:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in KINDS):
            raise SinkConfigError(
                f"{where}: types: {pattern!r} matches no event kind (kinds: {', '.join(KINDS)})"
            )
    secret = _secret(where, raw, env)
    numbers = {
        "timeout_s": (5.0, 0.1, 60.0),
        "backoff_s": (1.0, 0.01, 60.0),
        "max_backoff_s": (300.0, 0.01, 3600.0),
    }
    values: dict[str, float] = {}
    for field, (default, low, high) in numbers.items():
        value = raw.get(field, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise SinkConfigError(f"{where}: {field}: a number of seconds in [{low}, {high}]")
        values[field] = float(value)
    attempts = raw.get("poison_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        raise SinkConfigError(f"{where}: poison_attempts: an integer in [1, 100]")
    return Sink(name, url, tuple(types), secret, poison_attempts=attempts, **values)


def _secret(where: str, raw: dict[str, Any], env: Mapping[str, str]) -> bytes:
    if ("secret" in raw) == ("secret_env" in raw):
        raise SinkConfigError(f"{where}: give one of secret or secret_env (a variable's name)")
    if "secret_env" in raw:
        variable = raw["secret_env"]
        if not isinstance(variable, str) or not variable:
            raise SinkConfigError(f"{where}: secret_env: the name of an environment variable")
        secret = env.get(variable)
        if secret is None:
            raise SinkConfigError(f"{where}: secret_env: variable {variable[:64]!r} is not set")
    else:
        secret = raw["secret"]
        if not isinstance(secret, str):
            raise SinkConfigError(f"{where}: secret: a string")
    if len(secret) < MIN_SECRET_CHARS:  # never shown
        raise SinkConfigError(f"{where}: secret: at least {MIN_SECRET_CHARS} characters")
    return secret.encode()


_ENVELOPE = (
    b'{"specversion":"1.0","id":%s,"source":%s,"type":%s,"subject":%s,"time":"%s",'
    b'"datacontenttype":"application/json","data":%s}'
)


def rfc3339(seconds: float) -> str:
    """``2026-12-06T02:12:55.482113Z``: UTC, microseconds."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{int(seconds % 1 * 1e6):06d}Z"


def cloudevent(kind: str, source: str, ident: str, subject: str, at: float, data: bytes) -> bytes:
    """A CloudEvent 1.0 in structured JSON form, its ``data`` already JSON (``type`` is
    ``kind``, ``time`` is ``at`` in seconds since the epoch). The event stream's and the
    prediction log's envelopes both come from here."""
    return _ENVELOPE % (
        orjson.dumps(ident), orjson.dumps(source), orjson.dumps(kind), orjson.dumps(subject),
        rfc3339(at).encode(), data,
    )  # fmt: skip


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Turnout-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, window_s: float) -> bool:
    """What a receiver does (docs/events.md): the signature matches and is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body).partition(",v1=")[2]
    fresh = abs(now - timestamp) <= window_s
    return fresh and hmac.compare_digest(expected, parts.get("v1", ""))


def kinds_matching(pattern: str) -> frozenset[str]:
    return frozenset(k for k in KINDS if fnmatch.fnmatchcase(k, pattern))


class Events:
    """The stream. ``emit`` is its ``Emit``; ``start`` runs the pump and one delivery task per
    sink, ``stop`` ends them after a last pump into the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        sinks: Sequence[Sink] = (),
        *,
        source: str | None = None,
        tick_s: float = 1.0,
        lease_ttl_s: float = 3.0,
    ) -> None:
        self.outbox = outbox
        self.sinks = tuple(sinks)
        self.source = source or f"turnout/{socket.gethostname()}"
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.holder = holder_id()
        self.emitted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.depth: dict[str, int] = {}
        self.oldest_age_s: dict[str, float] = {}
        self._pending: deque[tuple[str, bytes]] = deque()
        self._pending_bytes = 0
        self._batch: tuple[str, int] | None = None  # the id and size of a batch in doubt
        self._lock = threading.Lock()  # emit may be called from other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake = asyncio.Event()
        self._appended: dict[str, asyncio.Event] = {s.name: asyncio.Event() for s in self.sinks}
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._renewed: dict[str, float] = {}  # sink -> when its lease was last extended here

    # -- emit (any thread, never blocks, never raises) ------------------------------------------
    def emit(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        try:
            self._emit(kind, subject, data)
        except Exception:  # the contract: never raise into the caller
            self.dropped["unserializable"] += 1
            log.exception("event %s about %s dropped", kind, subject)

    def _emit(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        if kind not in KINDS:
            self.dropped["unknown_kind"] += 1
            log.error("event of unknown kind %r dropped (a bug: kinds are %s)", kind[:64], KINDS)
            return
        try:
            options = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
            encoded = orjson.dumps(data, option=options)
            body = cloudevent(
                TYPE_PREFIX + kind, self.source, str(uuid.uuid4()), subject[:MAX_SUBJECT_CHARS],
                time.time(), encoded,
            )  # fmt: skip
        except TypeError:
            self.dropped["unserializable"] += 1
            log.error("event %s about %s has data that is not JSON: dropped", kind, subject[:64])
            return
        if len(body) > MAX_EVENT_BYTES:
            self.dropped["too_large"] += 1
            log.error("event %s about %s is %d bytes: dropped", kind, subject[:64], len(body))
            return
        with self._lock:
            if (
                len(self._pending) >= MAX_PENDING
                or self._pending_bytes + len(body) > MAX_PENDING_BYTES
            ):
                self.dropped["buffer_full"] += 1
                return
            self._pending.append((kind, body))
            self._pending_bytes += len(body)
        self.emitted[kind] += 1
        self._nudge()

    def _nudge(self) -> None:
        loop = self._loop
        if loop is None:
            return  # not started: the pump takes the buffer when it starts
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake.set)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._wake.set()
        try:
            await self.outbox.register([s.name for s in self.sinks])
        except OutboxUnavailable as exc:  # new sinks get their cursor once the outbox answers
            log.warning("event sinks not registered yet: %s", exc)
        self._client = httpx.AsyncClient(follow_redirects=False)
        self._tasks = [asyncio.create_task(self._pump_loop(), name="events pump")]
        for sink in self.sinks:
            task = asyncio.create_task(self._sink_loop(sink), name=f"events sink {sink.name}")
            self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        with contextlib.suppress(OutboxUnavailable):
            await self.pump()
        if self._client is not None:
            await self._client.aclose()
        await self.outbox.close()

    # -- pump: buffer -> outbox -----------------------------------------------------------------
    async def _pump_loop(self) -> None:
        registered = False
        failing = False  # logged when the outbox fails and when it is back, not every tick
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            try:
                if not registered:
                    await self.outbox.register([s.name for s in self.sinks])
                    registered = True
                await self.pump()
                if failing:
                    log.warning("event outbox available again")
                failing = False
            except OutboxUnavailable as exc:
                if not failing:
                    log.warning("events wait in memory, the outbox is unavailable: %s", exc)
                failing = True
            except Exception:
                log.exception("event pump failed")

    async def pump(self) -> None:
        """Move the buffer into the outbox, in order; what the outbox refuses is dropped."""
        while self._pending:
            # A batch that failed (timed out: it may yet apply) is resent whole, under its id.
            if self._batch is None:
                self._batch = (uuid.uuid4().hex, min(BATCH, len(self._pending)))
            ident, n = self._batch
            batch = [self._pending[i] for i in range(n)]
            taken = await self.outbox.append(batch, ident)
            self._batch = None
            with self._lock:
                for _ in batch:
                    _, body = self._pending.popleft()
                    self._pending_bytes -= len(body)
            if taken < len(batch):
                self.dropped["outbox_full"] += len(batch) - taken
                log.warning(
                    "event outbox full of undelivered events: %d dropped", len(batch) - taken
                )
            for appended in self._appended.values():
                appended.set()

    # -- delivery: outbox -> sink ---------------------------------------------------------------
    async def _sink_loop(self, sink: Sink) -> None:
        appended = self._appended[sink.name]
        failing = False
        while True:
            try:
                await self._backlog(sink)
                self._renewed.pop(sink.name, None)
                if await self._renew(sink):
                    more = await self._deliver_some(sink)
                    await self._backlog(sink)
                    failing = False
                    if more:
                        continue  # more may be waiting
            except OutboxUnavailable as exc:
                if not failing:
                    log.warning("events for %s wait, the outbox is unavailable: %s", sink.name, exc)
                failing = True
            except Exception:
                log.exception("event delivery to %s failed", sink.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(appended.wait(), self.tick_s)
            appended.clear()

    async def _backlog(self, sink: Sink) -> None:
        backlog = await self.outbox.backlog(sink.name)
        self.depth[sink.name] = backlog.depth
        oldest = backlog.oldest_at
        self.oldest_age_s[sink.name] = 0.0 if oldest is None else max(0.0, time.time() - oldest)

    async def _deliver_some(self, sink: Sink) -> bool:
        """Deliver what follows the sink's cursor, a batch at most; True when a whole batch
        was passed (so more may follow)."""
        cursor = await self.outbox.cursor(sink.name)
        entries = await self.outbox.read(cursor, BATCH)
        passed = cursor
        for entry in entries:
            if sink.wants(entry.kind):
                if passed > cursor and not await self._advance(sink, passed):
                    return False
                if not await self._deliver(sink, entry):
                    return False  # the lease went to another replica
            passed = entry.seq
        if passed > cursor and not await self._advance(sink, passed):
            return False
        return len(entries) == BATCH

    async def _advance(self, sink: Sink, seq: int) -> bool:
        moved = await self.outbox.advance(sink.name, seq, self.holder)
        if not moved:
            log.info("events for %s: lease lost, another replica delivers", sink.name)
        return moved

    async def _deliver(self, sink: Sink, entry: Entry) -> bool:
        """POST ``entry`` until the sink takes it (or refuses it as poison); then move the
        cursor past it. False when the lease was lost meanwhile."""
        assert self._client is not None
        attempt = 0
        refusals = 0
        while True:
            now = int(time.time())
            headers = {
                "Content-Type": CONTENT_TYPE,
                SIGNATURE_HEADER: signature(sink.secret, now, entry.body),
                "User-Agent": "turnout-events",
            }
            if not await self._renew(sink):
                return False
            try:
                status: int | None = await self._post(sink, entry.body, headers)
            except httpx.HTTPError as exc:
                status = None
                if attempt == 0:
                    log.warning("event %d to %s: %s", entry.seq, sink.name, type(exc).__name__)
            if status is not None and 200 <= status < 300:
                self.deliveries[(sink.name, "delivered")] += 1
                return await self._advance(sink, entry.seq)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                refusals += 1
                self.deliveries[(sink.name, "rejected")] += 1
                if refusals >= sink.poison_attempts:
                    self.deliveries[(sink.name, "poisoned")] += 1
                    log.error(
                        "event %d (%s) refused %d times by %s (HTTP %d): skipped",
                        entry.seq, entry.kind, refusals, sink.name, status,
                    )  # fmt: skip
                    return await self._advance(sink, entry.seq)
            else:
                self.deliveries[(sink.name, "failed")] += 1
            attempt += 1
            # full jitter: anywhere in [0, min(cap, base * 2^attempt)]
            delay = random.uniform(
                0, min(sink.max_backoff_s, sink.backoff_s * 2 ** min(attempt, 30))
            )
            if not await self._hold(sink, delay):
                return False

    async def _post(self, sink: Sink, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body``, renewing the sink's lease while the sink takes its time, so no other
        replica takes over a delivery in flight; the status answered."""
        client = self._client
        assert client is not None

        async def send() -> int:
            # The status only: the answer's body is never read (a sink cannot make us hold it).
            async with client.stream(
                "POST", sink.url, content=body, headers=headers, timeout=sink.timeout_s
            ) as response:
                return response.status_code

        post = asyncio.ensure_future(send())
        try:
            while True:
                done, _ = await asyncio.wait({post}, timeout=self.lease_ttl_s / 3)
                if done:
                    return post.result()
                await self._renew(sink)
        finally:
            post.cancel()

    async def _renew(self, sink: Sink) -> bool:
        """Extend the sink's lease when a third of it has run since it was last extended."""
        now = time.monotonic()
        if now - self._renewed.get(sink.name, -math.inf) < self.lease_ttl_s / 3:
            return True
        held = await self.outbox.acquire_lease(sink.name, self.holder, self.lease_ttl_s)
        if held:
            self._renewed[sink.name] = now
        return held

    async def _hold(self, sink: Sink, delay: float) -> bool:
        """Wait ``delay`` seconds keeping the sink's lease; False when it was lost."""
        deadline = time.monotonic() + delay
        while True:
            try:
                held = await self.outbox.acquire_lease(sink.name, self.holder, self.lease_ttl_s)
            except OutboxUnavailable:
                held = False
            if not held:
                return False
            self._renewed[sink.name] = time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            await self._backlog(sink)
            await asyncio.sleep(min(left, self.tick_s, self.lease_ttl_s / 3))

    # -- reading, for people --------------------------------------------------------------------
    async def page(self, before: int | None, limit: int, kinds: frozenset[str] | None) -> Page:
        return await self.outbox.page(before, limit, kinds)
