"""The event stream end to end against a real HTTP sink (tests.support.event_sink) that checks
every signature: CloudEvents attributes, order, outages, restarts of the gateway (file outbox and
Redis), once per fleet with two replicas on one Redis, bounded outbox, poison events, filters
and a sinks file rejected at start."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.background.drift_events import DriftWatcher
from gateway.background.events import (
    KINDS,
    Events,
    Sink,
    SinkConfigError,
    read_sinks,
    signature,
    verify,
)
from gateway.background.fleet import CountsExchange
from gateway.background.guards import GuardEvaluator
from gateway.background.shadow import ShadowRunner
from gateway.serving.loader import version_loader
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic
from gateway.settings import Settings
from router.policy.spec import parse_policy
from router.state.outbox import FileOutbox, MemoryOutbox, Outbox, Page
from router.state.redis_outbox import RedisOutbox
from router.state.store import MemoryStore
from router.state.table import RouteTable
from tests.conftest import REDIS_URL
from tests.support.event_sink import EventSink
from tests.support.redis_server import RedisServer, flush_prefix, fresh_prefix
from tests.support.server import reference_cache

pytestmark = pytest.mark.anyio
SECRET = "sink-secret-0123456789abcdef"


def make(outbox: Outbox, sinks: Sequence[Sink] = (), source: str | None = None) -> Events:
    """A stream with the short periods of tests."""
    return Events(outbox, sinks, source=source, tick_s=0.02, lease_ttl_s=0.5)


def sink_of(server: EventSink, tmp_path: Path, **extra: Any) -> Sink:
    path = tmp_path / f"sinks-{time.monotonic_ns()}.json"
    path.write_text(json.dumps([server.config(**extra)]))
    return read_sinks(path)[0]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def passed(outbox: Outbox, sink: str, seq: int, timeout: float = 10.0) -> None:
    """Wait until ``sink``'s cursor in the outbox is at ``seq``. The sink holding an event is
    not enough: its cursor moves after the sink answers (a round trip to Redis later), and
    ``Events.depth`` is refreshed only around delivery batches, so it can still read the 0 of
    before the first append."""
    deadline = time.monotonic() + timeout
    while await outbox.cursor(sink) < seq:
        if time.monotonic() > deadline:
            raise AssertionError(f"the cursor of {sink} never reached {seq}")
        await asyncio.sleep(0.01)


OutboxFactory = Callable[[int, int], Outbox]


@pytest.fixture(params=["memory", "file", "redis"])
async def new_outbox(request: pytest.FixtureRequest, tmp_path: Path) -> OutboxFactory:
    """Each outbox implementation, made with (max events, max bytes)."""
    prefix = await fresh_prefix(REDIS_URL) if request.param == "redis" else ""

    def factory(max_events: int, max_bytes: int) -> Outbox:
        if request.param == "memory":
            return MemoryOutbox(max_events, max_bytes)
        if request.param == "file":
            return FileOutbox(tmp_path / "outbox", max_events, max_bytes)
        return RedisOutbox(REDIS_URL, prefix, max_events, max_bytes)

    return factory


@pytest.fixture
async def sink() -> AsyncIterator[EventSink]:
    with EventSink(SECRET) as server:
        yield server


def emit_numbered(events: Events, n: int, start: int = 0, kind: str = "model.loaded") -> None:
    for i in range(start, start + n):
        events.emit(kind, f"fraud/{i}", {"n": i})


async def test_events_arrive_as_signed_cloudevents(sink: EventSink, tmp_path: Path) -> None:
    events = make(MemoryOutbox(1000, 1 << 20), [sink_of(sink, tmp_path)], source="turnout/t")
    await events.start()
    try:
        events.emit("drift.changed", "fraud/2/amount", {"from": "stable", "to": "act", "psi": 0.4})
        await until(lambda: events.deliveries[("test", "delivered")] == 1)
    finally:
        await events.stop()
    (event,) = sink.taken()
    assert not sink.bad
    assert event["specversion"] == "1.0" and event["type"] == "dev.turnout.drift.changed"
    assert event["source"] == "turnout/t" and event["subject"] == "fraud/2/amount"
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == {"from": "stable", "to": "act", "psi": 0.4}
    assert datetime.fromisoformat(event["time"]).utcoffset() is not None  # RFC 3339, with a zone
    assert len(event["id"]) == 36
    assert events.deliveries[("test", "delivered")] == 1 and events.emitted["drift.changed"] == 1


def test_signature_is_the_documented_hmac() -> None:
    body = b'{"id":"x"}'
    header = signature(b"k" * 16, 1700000000, body)
    import hashlib
    import hmac

    mac = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert verify(b"k" * 16, header, body, 1700000000 + 299, 300)
    assert not verify(b"k" * 16, header, body, 1700000000 + 301, 300)  # replayed too late
    assert not verify(b"k" * 16, header, body + b" ", 1700000000, 300)  # body changed
    assert not verify(b"x" * 16, header, body, 1700000000, 300)  # another secret


async def test_an_outage_delays_but_loses_nothing_and_keeps_order(
    sink: EventSink, tmp_path: Path, new_outbox: OutboxFactory
) -> None:
    with EventSink(SECRET) as healthy:
        events = make(
            new_outbox(1000, 1 << 20),
            [sink_of(sink, tmp_path, name="down"), sink_of(healthy, tmp_path, name="up")],
        )
        sink.status = 503
        await events.start()
        try:
            emit_numbered(events, 30)
            # the healthy sink is not held back by the one that is down
            await until(lambda: len(healthy.taken()) == 30)
            await until(lambda: events.deliveries[("down", "failed")] >= 3)
            assert sink.taken() == [] and events.depth["down"] == 30
            sink.status = 200
            await until(lambda: len(sink.taken()) == 30)
            await until(lambda: events.depth == {"down": 0, "up": 0})
        finally:
            await events.stop()
        for server in (sink, healthy):
            assert [e["data"]["n"] for e in server.taken()] == list(range(30))


async def test_a_sink_off_the_network_is_retried_until_it_is_back(tmp_path: Path) -> None:
    server = EventSink(SECRET)
    events = make(MemoryOutbox(1000, 1 << 20), [sink_of(server, tmp_path)])
    await events.start()
    try:
        emit_numbered(events, 5)
        await until(lambda: events.deliveries[("test", "failed")] >= 3)
        server.start()
        await until(lambda: len(server.taken()) == 5)
    finally:
        await events.stop()
        server.stop()
    assert len({e["id"] for e in server.taken()}) == 5


async def test_type_filters_choose_what_a_sink_gets(
    sink: EventSink, tmp_path: Path, new_outbox: OutboxFactory
) -> None:
    events = make(
        new_outbox(1000, 1 << 20), [sink_of(sink, tmp_path, types=["drift.*", "guard.acted"])]
    )
    await events.start()
    try:
        for kind in KINDS:
            events.emit(kind, "fraud", {})
        await until(lambda: len(sink.taken()) == 2 and events.depth.get("test") == 0)
        await asyncio.sleep(0.1)  # nothing more arrives
    finally:
        await events.stop()
    assert [e["type"] for e in sink.taken()] == [
        "dev.turnout.guard.acted",
        "dev.turnout.drift.changed",
    ]


async def test_a_poison_event_is_skipped_after_its_attempts_and_counted(
    sink: EventSink, tmp_path: Path, new_outbox: OutboxFactory
) -> None:
    outbox = new_outbox(1000, 1 << 20)
    events = make(outbox, [sink_of(sink, tmp_path, poison_attempts=3)])
    emit_numbered(events, 3)
    poison = json.loads(outbox_bodies(events)[1])["id"]
    sink.refuse.add(poison)
    await events.start()
    try:
        await until(lambda: len(sink.taken()) == 2)
    finally:
        await events.stop()
    assert [e["data"]["n"] for e in sink.taken()] == [0, 2]
    assert sink.attempts.count(poison) == 3
    assert events.deliveries[("test", "rejected")] == 3
    assert events.deliveries[("test", "poisoned")] == 1


def outbox_bodies(events: Events) -> list[bytes]:
    return [body for _, body in events._pending]


async def test_a_full_outbox_drops_the_newest_and_counts(
    sink: EventSink, tmp_path: Path, new_outbox: OutboxFactory
) -> None:
    sink.status = 503
    outbox = new_outbox(5, 1 << 20)
    events = make(outbox, [sink_of(sink, tmp_path)])
    await events.start()
    try:
        emit_numbered(events, 8)
        await until(lambda: events.dropped["outbox_full"] == 3)
        sink.status = 200
        await until(lambda: len(sink.taken()) == 5)
        # Delivered means passed by the cursor: only then can an append evict the entries.
        await passed(outbox, "test", 5)
        emit_numbered(events, 8, start=8)  # delivered entries make room again
        await until(lambda: len(sink.taken()) == 10)
        listed = await outbox.page(None, 100, None)
    finally:
        await events.stop()
    assert [e["data"]["n"] for e in sink.taken()] == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]
    assert events.dropped["outbox_full"] == 6  # 13, 14, 15: only 5 fit while 5 wait
    assert [json.loads(e.body)["data"]["n"] for e in listed.entries] == [12, 11, 10, 9, 8]


async def test_the_outbox_is_bounded_in_bytes_too(
    sink: EventSink, tmp_path: Path, new_outbox: OutboxFactory
) -> None:
    sink.status = 503
    outbox = new_outbox(1000, 4000)
    events = make(outbox, [sink_of(sink, tmp_path)])
    await events.start()
    try:
        for i in range(10):
            events.emit("model.failed", f"fraud/{i}", {"reason": "x" * 1000})
        await until(lambda: events.dropped["outbox_full"] == 7)
        kept = (await outbox.page(None, 100, None)).entries
    finally:
        await events.stop()
    assert len(kept) == 3 and sum(len(e.body) for e in kept) <= 4000


async def test_pages_of_the_outbox_go_back_through_every_entry_once(
    new_outbox: OutboxFactory,
) -> None:
    outbox = new_outbox(1000, 1 << 20)
    items = [(KINDS[i % 3], b'{"n":%d}' % i) for i in range(25)]
    assert await outbox.append(items, "first") == 25
    assert await outbox.append(items, "first") == 25  # resent (in doubt): appended once
    seen: list[bytes] = []
    cursor = None
    while True:
        page = await outbox.page(cursor, 4, frozenset(KINDS[:2]))
        seen += [e.body for e in page.entries]
        if page.next is None:
            break
        cursor = page.next
    assert seen == [b for k, b in reversed(items) if k in KINDS[:2]]
    assert (await outbox.page(None, 1, None)).next == 25
    assert (await outbox.page(1, 10, None)) == Page([], None)
    await outbox.close()


async def test_emit_never_raises_and_counts_what_it_drops() -> None:
    events = Events(MemoryOutbox(10, 1 << 20))
    events.emit("model.exploded", "fraud/1", {})
    events.emit("model.loaded", "fraud/1", {"x": object()})
    events.emit("model.loaded", "fraud/1", {"x": "y" * 70_000})
    assert events.dropped == {"unknown_kind": 1, "unserializable": 1, "too_large": 1}
    assert not events.emitted


async def test_file_outbox_survives_a_gateway_restart(sink: EventSink, tmp_path: Path) -> None:
    directory = tmp_path / "events"
    sink.status = 503
    first = make(FileOutbox(directory, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await first.start()
    emit_numbered(first, 4)
    await until(lambda: first.deliveries[("test", "failed")] >= 1)
    emit_numbered(first, 3, start=4)  # still in the buffer at stop: the last pump keeps them
    await first.stop()
    sink.status = 200
    second = make(FileOutbox(directory, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await second.start()
    try:
        await until(lambda: numbers(sink) == list(range(7)))
        emit_numbered(second, 1, start=7)
        # taken, and the cursor moved past it (a stop in between would deliver it again)
        await until(lambda: numbers(sink) == list(range(8)))
        await passed(second.outbox, "test", 8)
    finally:
        await second.stop()
    assert numbers(sink) == list(range(8))
    taken = len(sink.taken())
    # a third start delivers nothing again
    third = make(FileOutbox(directory, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await third.start()
    await asyncio.sleep(0.2)
    await third.stop()
    assert len(sink.taken()) == taken


def numbers(sink: EventSink) -> list[int]:
    """The ``n`` of each event the sink took, in order, once per event id: a POST cut off by a
    stop may have reached the sink and comes again, with its id, after the restart."""
    seen: dict[str, int] = {}
    for event in sink.taken():
        seen.setdefault(event["id"], event["data"]["n"])
    return list(seen.values())


async def test_file_outbox_is_compacted_once_delivered(sink: EventSink, tmp_path: Path) -> None:
    directory = tmp_path / "events"
    events = make(FileOutbox(directory, 100, 1 << 20), [sink_of(sink, tmp_path)])
    await events.start()
    try:
        for start in range(100, 700, 100):
            emit_numbered(events, 100, start=start - 100)
            await until(lambda: len(sink.taken()) == start)  # noqa: B023
            await passed(events.outbox, "test", start)  # or the next 100 would not all fit
    finally:
        await events.stop()
    assert events.dropped["outbox_full"] == 0
    assert len({e["id"] for e in sink.taken()}) == 600
    lines = (directory / "outbox.jsonl").read_bytes().count(b"\n")
    assert lines <= 2 * 100 + 100  # rewritten without the delivered entries, not 600 lines


async def test_redis_outbox_survives_a_gateway_restart(sink: EventSink, tmp_path: Path) -> None:
    prefix = await fresh_prefix(REDIS_URL)
    sink.status = 503
    first = make(RedisOutbox(REDIS_URL, prefix, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await first.start()
    emit_numbered(first, 5)
    await until(lambda: first.deliveries[("test", "failed")] >= 1)
    await first.stop()
    await asyncio.sleep(0.6)  # the first one's lease runs out
    sink.status = 200
    second = make(RedisOutbox(REDIS_URL, prefix, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await second.start()
    try:
        await until(lambda: numbers(sink) == list(range(5)))
    finally:
        await second.stop()
    assert numbers(sink) == list(range(5))


async def test_two_replicas_on_redis_deliver_each_event_once(
    sink: EventSink, tmp_path: Path
) -> None:
    prefix = await fresh_prefix(REDIS_URL)
    replicas = [
        make(RedisOutbox(REDIS_URL, prefix, 10_000, 16 << 20), [sink_of(sink, tmp_path)])
        for _ in range(2)
    ]
    for replica in replicas:
        await replica.start()
    try:
        for i in range(100):
            replicas[i % 2].emit("policy.changed", "fraud", {"n": i})
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        await until(lambda: len(sink.taken()) >= 100)
        await asyncio.sleep(0.3)  # time for a duplicate, were there one
    finally:
        for replica in replicas:
            await replica.stop()
    ids = [e["id"] for e in sink.taken()]
    assert len(ids) == 100 and len(set(ids)) == 100
    assert sorted(e["data"]["n"] for e in sink.taken()) == list(range(100))
    assert sum(r.deliveries[("test", "delivered")] for r in replicas) == 100


async def test_a_replica_taking_over_resumes_where_the_other_stopped(
    sink: EventSink, tmp_path: Path
) -> None:
    prefix = await fresh_prefix(REDIS_URL)
    a = make(RedisOutbox(REDIS_URL, prefix, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    b = make(RedisOutbox(REDIS_URL, prefix, 1000, 1 << 20), [sink_of(sink, tmp_path)])
    await a.start()
    emit_numbered(a, 10)
    await until(lambda: len(sink.taken()) == 10)
    await b.start()
    await a.stop()  # the leader leaves; b takes the lease once it runs out
    try:
        emit_numbered(b, 10, start=10)
        await until(lambda: len(sink.taken()) == 20)
    finally:
        await b.stop()
    assert [e["data"]["n"] for e in sink.taken()] == list(range(20))


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "sinks.json"
    path.write_text(json.dumps(doc))
    return path


GOOD = {"name": "ci", "url": "https://hooks.example.com/t", "secret": "s" * 16}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"name": "ci"}, "must be a JSON list"),
        ([GOOD] * 33, "at most 32 sinks"),
        (["x"], "sink 0: must be an object"),
        ([{**GOOD, "nmae": 1}], "unknown field 'nmae'"),
        ([{**GOOD, "name": "Bad Name"}], "name: required"),
        ([{**GOOD, "name": "x" * 64}], "name: required"),
        ([GOOD, GOOD], "name 'ci' given twice"),
        ([{**GOOD, "url": "ftp://x/y"}], "url: must be an http"),
        ([{**GOOD, "url": "http://"}], "url: must be an http"),
        ([{**GOOD, "url": "http://x/" + "a" * 3000}], "url: required"),
        ([{**GOOD, "types": []}], "types: a non-empty list"),
        ([{**GOOD, "types": ["drfit.*"]}], "'drfit.*' matches no event kind"),
        ([{**GOOD, "types": ["*"] * 65}], "types: a non-empty list"),
        ([{k: v for k, v in GOOD.items() if k != "secret"}], "one of secret or secret_env"),
        ([{**GOOD, "secret_env": "X"}], "one of secret or secret_env"),
        ([{**GOOD, "secret": "short"}], "secret: at least 16"),
        ([{"name": "ci", "url": GOOD["url"], "secret_env": "TURNOUT_TEST_UNSET"}], "is not set"),
        ([{**GOOD, "timeout_s": 0}], "timeout_s: a number"),
        ([{**GOOD, "timeout_s": True}], "timeout_s: a number"),
        ([{**GOOD, "max_backoff_s": 1e9}], "max_backoff_s: a number"),
        ([{**GOOD, "poison_attempts": 0}], "poison_attempts: an integer"),
    ],
)
def test_a_bad_sinks_file_is_rejected_naming_the_problem(
    tmp_path: Path, doc: Any, message: str
) -> None:
    with pytest.raises(
        SinkConfigError, match=message.replace("*", r"\*").replace(".", r"\.")
    ) as exc:
        read_sinks(write(tmp_path, doc), environ={})
    assert "s" * 16 not in str(exc.value)  # a secret is never shown


def test_unreadable_sinks_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SinkConfigError, match="cannot read it"):
        read_sinks(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(SinkConfigError, match="not JSON"):
        read_sinks(bad)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(SinkConfigError, match="larger than"):
        read_sinks(big)


def test_a_secret_may_come_from_the_environment(tmp_path: Path) -> None:
    doc = [{"name": "ci", "url": GOOD["url"], "secret_env": "HOOK_SECRET", "types": ["model.*"]}]
    (sink,) = read_sinks(write(tmp_path, doc), environ={"HOOK_SECRET": "e" * 20})
    assert (
        sink.secret == b"e" * 20 and sink.wants("model.failed") and not sink.wants("drift.changed")
    )


# -- the events of today's components --------------------------------------------------------


async def kinds_and_data(events: Events) -> list[tuple[str, str, dict[str, Any]]]:
    """Everything emitted so far, oldest first, as (kind, subject, data)."""
    await events.pump()
    page = await events.outbox.page(None, 1000, None)
    bodies = [json.loads(e.body) for e in reversed(page.entries)]
    return [(b["type"].removeprefix("dev.turnout."), b["subject"], b["data"]) for b in bodies]


CANARY = {
    "strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25,
    "guards": {"window_s": 30, "min_requests": 100, "interval_s": 1, "max_error_ratio": 0.05},
}  # fmt: skip


async def failing_canary(registry: Registry, store: MemoryStore, events: Events) -> int:
    """A guarded canary whose candidate fails 20 % of 100 requests, judged three times by a
    GuardEvaluator emitting to ``events``; the revision written first."""
    table = RouteTable(store, emit=events.emit)
    traffic = Traffic()
    shadows = ShadowRunner(registry, 8)
    guards = GuardEvaluator(table, registry, shadows, traffic, GuardMetrics(), emit=events.emit)
    try:
        record = await table.write(
            "fraud", parse_policy(CANARY), expected=None, who="tester", action="put",
            reason="canary", artifacts={"1": "a", "2": "b"},
        )  # fmt: skip
        assert record is not None
        await guards.tick(100.0)
        traffic.requests[("fraud", "1", "baseline", "200")] += 300
        traffic.requests[("fraud", "2", "candidate", "200")] += 80
        traffic.requests[("fraud", "2", "candidate", "500")] += 20
        await guards.tick(101.0)
        await guards.tick(102.0)  # the verdict on the new revision: no second breach event
    finally:
        await shadows.close()
    return record.revision


async def test_guard_breaches_and_actions_are_events(registry: Registry) -> None:
    events = make(MemoryOutbox(1000, 1 << 20))
    revision = await failing_canary(registry, MemoryStore(), events)
    seen = await kinds_and_data(events)
    assert [k for k, _, _ in seen] == [
        "policy.changed", "guard.breached", "policy.changed", "guard.acted",
    ]  # fmt: skip
    assert all(subject == "fraud" for _, subject, _ in seen)
    put, breached, rolled_back, acted = (data for _, _, data in seen)
    assert put == {"who": "tester", "why": "canary", "revision": revision,
                   "policy": "canary", "action": "put"}  # fmt: skip
    assert breached["condition"] == "max_error_ratio" and breached["version"] == "2"
    assert breached["value"] > breached["threshold"] == 0.05  # the bound judged, not the ratio
    assert breached["action"] == "rollback" and breached["who"] == "guard:max_error_ratio"
    assert rolled_back["who"] == "guard:max_error_ratio" and rolled_back["policy"] == "single"
    assert rolled_back["revision"] == revision + 1
    assert acted == {
        "condition": "max_error_ratio", "version": "2", "action": "rollback",
        "who": "guard:max_error_ratio", "reason": acted["reason"],
        "revision": revision + 1, "from_revision": revision,
    }  # fmt: skip


async def test_a_guard_without_the_lease_emits_nothing(registry: Registry) -> None:
    store = MemoryStore()
    assert await store.acquire_lease("guards", "someone else", 60.0)
    events = make(MemoryOutbox(1000, 1 << 20))
    await failing_canary(registry, store, events)
    # the person's change only: no verdict, no action
    assert [k for k, _, _ in await kinds_and_data(events)] == ["policy.changed"]


async def test_model_loads_unloads_and_failures_are_events(
    fraud_repo: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(fraud_repo / "fraud", root / "fraud")
    (root / "fraud" / "3").mkdir()
    (root / "fraud" / "3" / "model.onnx").write_bytes(b"not a model")
    events = make(MemoryOutbox(1000, 1 << 20))
    settings = Settings(model_repository=root, cache_dir=reference_cache())
    with ThreadPoolExecutor(2) as executor:
        registry = Registry(
            root, version_loader(settings, executor, lambda: False), emit=events.emit
        )
        await registry.load_all()
        await registry.unload("fraud", ["1"])
        await registry.close()
    seen = await kinds_and_data(events)
    assert sorted((k, s) for k, s, _ in seen) == sorted(
        [("model.loaded", "fraud/1"), ("model.loaded", "fraud/2"), ("model.failed", "fraud/3"),
         ("model.unloaded", "fraud/1"), ("model.unloaded", "fraud/2")]
    )  # fmt: skip
    assert len({d["replica"] for _, _, d in seen}) == 1
    failed = next(d for k, _, d in seen if k == "model.failed")
    assert failed["version"] == "3" and failed["reason"] and failed["serving"] is None
    loaded = next(d for k, s, d in seen if k == "model.loaded" and s == "fraud/1")
    assert len(loaded["sha256"]) == 64 and loaded["replaced"] is None


async def test_drift_changes_are_announced_once_across_a_handover(registry: Registry) -> None:
    loaded = registry.get("fraud", "1")
    reference = np.load(registry.root / "fraud" / "1" / "reference.npy").astype(np.float32)
    rows = reference[:1500].copy()
    rows[:, 0] += 5.0 * reference[:, 0].std()  # feature 0 shifted by five standard deviations
    loaded.monitor.observe(rows, {}, 0.001, 0.001, time.monotonic())
    store, outbox = MemoryStore(), MemoryOutbox(1000, 1 << 20)
    events = make(outbox)
    exchange = CountsExchange(store, registry, Traffic(), shared=False, workers=1)

    def watcher() -> DriftWatcher:
        return DriftWatcher(registry, exchange, store, outbox, events.emit, lease_ttl_s=1.0)

    first, second = watcher(), watcher()
    await first.tick()
    await second.tick()  # not the leader: judges nothing, emits nothing
    await first.tick()  # the status holds: nothing new
    seen = await kinds_and_data(events)
    assert [(k, s.rsplit("/", 1)[0]) for k, s, _ in seen] == [("drift.changed", "fraud/1")]
    (_, subject, data) = seen[0]
    assert subject == f"fraud/1/{loaded.monitor.snapshot(time.monotonic())['features'][0]['name']}"
    assert data["from"] == "stable" and data["to"] in ("watch", "act")
    assert data["psi"] > 0.1 and data["column"] == "feature"
    assert first.leader and not second.leader
    await asyncio.sleep(1.1)  # the first one's lease runs out: the second takes over
    await second.tick()
    assert second.leader and len(await kinds_and_data(events)) == 1  # it read the statuses
    # a watcher that had not kept them would have announced the drift again
    fresh = DriftWatcher(registry, exchange, MemoryStore(), MemoryOutbox(10, 1 << 20), events.emit)
    await fresh.tick()
    assert len(await kinds_and_data(events)) == 2


async def test_a_redis_outbox_emptied_delivers_every_event_that_follows(
    sink: EventSink, tmp_path: Path
) -> None:
    """Redis restarted empty: the cursors went with the stream. The events emitted after it are
    numbered from 1 again and every one reaches the sink (none is taken as already passed)."""
    prefix = await fresh_prefix(REDIS_URL)
    outbox = RedisOutbox(REDIS_URL, prefix, 1000, 1 << 20)
    events = make(outbox, [sink_of(sink, tmp_path)])
    await events.start()
    try:
        emit_numbered(events, 3)
        await until(lambda: len(sink.taken()) == 3)
        await passed(outbox, "test", 3)
        assert await flush_prefix(REDIS_URL, prefix) > 0
        emit_numbered(events, 4, start=3)
        await until(lambda: numbers(sink) == list(range(7)))
        await passed(outbox, "test", 4)
    finally:
        await events.stop()
        await flush_prefix(REDIS_URL, prefix)
    assert not events.dropped


async def test_events_wait_in_memory_while_redis_is_down(sink: EventSink, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        events = make(RedisOutbox(server.url, "t:", 1000, 1 << 20), [sink_of(sink, tmp_path)])
        await events.start()
        try:
            emit_numbered(events, 3)
            # delivered and recorded (a delivery in doubt when Redis hangs may come again)
            await until(lambda: len(sink.taken()) == 3)
            await passed(events.outbox, "test", 3)
            server.pause()  # a hung Redis: every command times out
            emit_numbered(events, 4, start=3)
            await asyncio.sleep(1.5)  # at least one pump times out
            assert len(events._pending) == 4 and len(sink.taken()) == 3
            server.resume()
            await until(lambda: len(sink.taken()) == 7)
        finally:
            await events.stop()
    assert [e["data"]["n"] for e in sink.taken()] == list(range(7))
    assert not events.dropped


async def test_emit_from_another_thread_is_delivered(sink: EventSink, tmp_path: Path) -> None:
    events = make(MemoryOutbox(1000, 1 << 20), [sink_of(sink, tmp_path)])
    await events.start()
    try:
        thread = threading.Thread(target=emit_numbered, args=(events, 50))
        thread.start()
        thread.join()
        await until(lambda: len(sink.taken()) == 50)
    finally:
        await events.stop()
    assert [e["data"]["n"] for e in sink.taken()] == list(range(50))
