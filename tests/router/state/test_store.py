from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from router.state.redis_store import RedisStore
from router.state.store import (
    LIMITS_AUDIT,
    ArmStats,
    Assignment,
    MemoryStore,
    RolloutCopy,
    RouteRecord,
    StaleRevision,
    StateStore,
    StoreUnavailable,
)
from tests.support.redis_server import RedisServer, flush_prefix, fresh_prefix

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05}
ARTIFACTS = {"1": "a" * 64, "2": "b" * 64}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Replicas:
    """Handles on one shared state, as gateway replicas hold: separate RedisStore instances on
    one prefix, or the one MemoryStore of a single process."""

    def __init__(self, make: Callable[[], StateStore]) -> None:
        self._make = make
        self.opened: list[StateStore] = []

    def open(self) -> StateStore:
        store = self._make()
        self.opened.append(store)
        return store


@pytest.fixture(params=["memory", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    if request.param == "memory":
        shared = MemoryStore()
        yield Replicas(lambda: shared)
        await shared.close()
        return
    prefix = await fresh_prefix(REDIS_URL)
    handles = Replicas(lambda: RedisStore(REDIS_URL, prefix))
    yield handles
    for store in handles.opened:
        await store.close()
    await flush_prefix(REDIS_URL, prefix)


@pytest.fixture
def store(replicas: Replicas) -> StateStore:
    return replicas.open()


async def put(store: StateStore, model: str, doc: dict[str, Any] | None, **kw: Any) -> Any:
    kw.setdefault("expected", None)
    kw.setdefault("who", "alice")
    kw.setdefault("action", "put" if doc is not None else "delete")
    kw.setdefault("reason", "test")
    kw.setdefault("artifacts", ARTIFACTS)
    return await store.put_route(model, doc, **kw)


async def test_revisions_increase_by_one_and_are_shared_across_models(store: StateStore) -> None:
    assert await store.revision() == 0
    assert await store.routes() == (0, {})
    first = await put(store, "fraud", CANARY)
    second = await put(store, "risk", {"strategy": "fixed", "version": "3"})
    third = await put(store, "fraud", CANARY | {"weight": 0.5})
    assert [first.revision, second.revision, third.revision] == [1, 2, 3]
    revision, records = await store.routes()
    assert revision == await store.revision() == 3
    assert records["fraud"].doc == CANARY | {"weight": 0.5}
    assert records["fraud"].revision == 3
    assert records["risk"].revision == 2


async def test_documents_round_trip_exactly_and_are_copies(store: StateStore) -> None:
    doc: dict[str, Any] = {
        "weight": 0.1234567890123456789,
        "tiny": 5e-324,
        "empty_list": [],
        "empty_map": {},
        "nested": [{"é": "ü"}, None, True, 2**53 + 1],
    }
    expected = dict(doc)
    await put(store, "m", doc)
    doc["weight"] = 1.0  # the caller's dict is not the stored one
    _, records = await store.routes()
    assert records["m"].doc == expected
    records["m"].doc["weight"] = 2.0
    assert (await store.routes())[1]["m"].doc == expected
    assert (await store.audit("m"))[0].after == expected


async def test_if_match_conflict_raises_and_changes_nothing(store: StateStore) -> None:
    with pytest.raises(StaleRevision) as missing:
        await put(store, "fraud", CANARY, expected=4)
    assert missing.value.current == 0
    created = await put(store, "fraud", CANARY, expected=0)
    await put(store, "risk", CANARY)
    before = (await store.routes(), await store.audit(limit=1000))

    with pytest.raises(StaleRevision) as stale:
        await put(store, "fraud", {"strategy": "fixed", "version": "2"}, expected=0)
    assert stale.value.current == created.revision == 1
    assert (await store.routes(), await store.audit(limit=1000)) == before

    updated = await put(store, "fraud", {"strategy": "fixed", "version": "2"}, expected=1)
    assert updated.revision == 3


async def test_delete_removes_the_route_and_is_audited(store: StateStore) -> None:
    await put(store, "fraud", CANARY)
    await put(store, "risk", CANARY)
    assert await put(store, "fraud", None, expected=1, reason="retired") is None
    revision, records = await store.routes()
    assert revision == 3
    assert set(records) == {"risk"}
    entry = (await store.audit("fraud"))[0]
    assert (entry.action, entry.before, entry.after) == ("delete", CANARY, None)
    # no record is revision 0 again for If-Match
    assert (await put(store, "fraud", CANARY, expected=0)).revision == 4


async def test_audit_entries_are_complete_newest_first_filtered_and_limited(
    store: StateStore,
) -> None:
    advanced = CANARY | {"weight": 0.25}
    evidence = {"p_value": 0.001, "errors": [1, 2]}
    t0 = time.time()
    await put(store, "fraud", CANARY, who="alice", reason="start canary")
    await put(store, "risk", {"strategy": "fixed", "version": "1"}, artifacts={"1": "c" * 64})
    await put(
        store,
        "fraud",
        advanced,
        who="guard:latency",
        action="advance",
        reason="healthy",
        details=evidence,
    )
    t1 = time.time()

    entries = await store.audit()
    assert [e.revision for e in entries] == [3, 2, 1]
    newest = entries[0]
    assert (newest.who, newest.model, newest.action, newest.reason) == (
        "guard:latency",
        "fraud",
        "advance",
        "healthy",
    )
    assert (newest.before, newest.after) == (CANARY, advanced)
    assert newest.artifacts == ARTIFACTS
    assert newest.details == evidence
    assert entries[2].before is None
    assert entries[2].details == {}
    # the store's clock (Redis TIME, same host) truncates to microseconds: allow 1 ms either side
    assert all(t0 - 1e-3 <= e.at <= t1 + 1e-3 for e in entries)
    assert entries[0].at >= entries[1].at >= entries[2].at

    assert [e.revision for e in await store.audit("fraud")] == [3, 1]
    assert [e.revision for e in await store.audit("risk")] == [2]
    assert await store.audit("unknown") == []
    assert [e.revision for e in await store.audit(limit=2)] == [3, 2]
    assert [e.revision for e in await store.audit("fraud", limit=1)] == [3]
    assert await store.audit(limit=0) == []


async def walk(
    store: StateStore, model: str | None, limit: int, between: Callable[[], Awaitable[Any]]
) -> list[int]:
    """Every page of a trail from the newest, calling ``between`` after each page."""
    revisions: list[int] = []
    cursor = None
    while True:
        page = await store.audit_page(model, limit, cursor)
        revisions += [orjson.loads(e)["revision"] for e in page.entries]
        if page.next is None:
            return revisions
        cursor = page.next
        await between()


async def test_audit_pages_walk_a_trail_longer_than_a_page_while_entries_are_appended(
    store: StateStore,
) -> None:
    """Issue 14, finding 10: the audit trail is read a page at a time, and a cursor does not
    shift when entries are appended between pages (no entry repeated or skipped)."""
    for i in range(25):
        await put(store, ("fraud", "risk")[i % 2], CANARY | {"weight": i / 100})
    appended = 0

    async def append() -> None:
        nonlocal appended
        appended += 1
        await put(store, "fraud", CANARY | {"weight": 0.5 + appended / 100})

    assert await walk(store, None, 10, append) == list(range(25, 0, -1))
    assert appended == 2  # two pages followed the first
    fraud = list(range(27, 0, -1))  # every revision of fraud: odd up to 25, then 26 and 27
    fraud = [r for r in fraud if r > 25 or r % 2 == 1]
    assert await walk(store, "fraud", 4, append) == fraud
    assert await walk(store, "risk", 100, append) == list(range(24, 0, -2))
    page = await store.audit_page("unknown", 10)
    assert (page.entries, page.next) == ([], None)


async def test_limits_writes_keep_audit_cursors_in_step(store: StateStore) -> None:
    """A rate-limits write is an entry of the global trail like a route write: paging the trail
    while limits are put between pages repeats and skips nothing (its entries count in the
    trail's sequence, which cursors are measured from)."""
    for i in range(6):
        await put(store, "fraud", CANARY | {"weight": i / 100})
        await store.put_limits({"rules": []}, who="alice", reason=f"limits {i}")

    async def put_limits() -> None:
        await store.put_limits({"rules": []}, who="alice", reason="between pages")

    assert await walk(store, None, 5, put_limits) == list(range(12, 0, -1))
    limits = [r for r in range(12, 0, -1) if r % 2 == 0]
    assert await walk(store, LIMITS_AUDIT, 2, put_limits) == [14, 13, *limits]


async def test_a_redis_trail_written_before_paging_pages_from_its_length(
    replicas: Replicas,
) -> None:
    """A trail an older gateway wrote has no audit_seq count: the count starts at its length."""
    store = replicas.open()
    if not isinstance(store, RedisStore):
        pytest.skip("Redis only")
    for _ in range(5):
        await put(store, "fraud", CANARY)
    raw = Redis.from_url(REDIS_URL)
    await raw.delete(store._key("audit_seq"))
    await raw.aclose()

    async def nothing() -> None:
        pass

    assert await walk(store, "fraud", 2, nothing) == [5, 4, 3, 2, 1]
    await put(store, "fraud", CANARY)
    assert await walk(store, None, 2, nothing) == [6, 5, 4, 3, 2, 1]


async def test_an_audit_page_stops_past_its_byte_budget(store: StateStore) -> None:
    for i in range(6):
        await put(store, "fraud", CANARY, reason=f"{i} " + "x" * 1000)
    page = await store.audit_page(None, 100, max_bytes=3_000)
    assert 1 <= len(page.entries) < 6 and sum(map(len, page.entries)) <= 3_000
    assert page.next == 6 - len(page.entries)
    rest = await store.audit_page(None, 100, page.next, max_bytes=10**6)
    assert [orjson.loads(e)["revision"] for e in page.entries + rest.entries] == [6, 5, 4, 3, 2, 1]
    # one entry larger than the budget still makes a page, so paging always moves on
    (single,) = (await store.audit_page(None, 100, max_bytes=10)).entries
    assert orjson.loads(single)["revision"] == 6


async def test_a_store_behind_a_replica_takes_back_only_what_it_lost(replicas: Replicas) -> None:
    """A store restarted empty, where an engineer has already written ``risk`` again: two
    replicas restore at once; the first puts back ``fraud`` (its own revision, its bandit
    totals, an audit entry) and leaves ``risk`` as written; the second changes nothing."""
    first, second = replicas.open(), replicas.open()
    risk_now = {"strategy": "single", "version": "2"}
    await put(first, "risk", risk_now)  # revision 1, after the reset
    bandit = {"strategy": "bandit", "arms": ["1", "2"]}
    kept = [
        RouteRecord("fraud", bandit, 5),
        RouteRecord("risk", {"strategy": "single", "version": "1"}, 6),
    ]
    totals = {
        "fraud": {"1": ArmStats(rewards=3, reward_sum=1.5), "2": ArmStats(rewards=2)},
        "risk": {"1": ArmStats(served=9)},
    }
    done = await asyncio.gather(
        *(
            s.restore(7, kept, totals, who=f"restore:{i}", reason="lost")
            for i, s in enumerate((first, second))
        )
    )
    assert sorted(done) == [False, True]
    assert await second.restore(8, [], {}, who="late", reason="lost") is True  # still behind 8
    assert await first.restore(8, kept, totals, who="again", reason="lost") is False
    revision, records = await first.routes()
    assert revision == 8
    assert records == {
        "fraud": RouteRecord("fraud", bandit, 5),
        "risk": RouteRecord("risk", risk_now, 1),
    }
    assert await first.stats("fraud", 5) == totals["fraud"]  # added once
    assert await first.stats("risk", 6) == {}  # risk was not restored
    (entry,) = await first.audit("fraud")
    assert (entry.revision, entry.action, entry.reason) == (5, "restore", "lost")
    assert entry.who.startswith("restore:") and (entry.before, entry.after) == (None, bandit)
    assert [e.action for e in await first.audit()] == ["restore", "put"]
    assert (await put(second, "fraud", None)) is None
    assert await first.revision() == 9  # revisions go on from the restored one


async def test_a_restore_puts_back_the_rollout_templates_and_states_it_holds(
    replicas: Replicas,
) -> None:
    """Under the same gate as the policies: only what a model has none of now, each under its
    own revision or sequence number, so the engine's next If-Match write applies."""
    store = replicas.open()
    now = {"steps": [1.0]}
    await store.put_rollout("risk", now, expected=None, who="a", action="rollout_put", reason="")
    template = {"steps": [0.25, 1.0], "approval": "required"}
    state = {"model": "fraud", "phase": "awaiting_approval", "decision": None}
    copy = RolloutCopy(
        templates={"fraud": (6, template), "risk": (4, {"steps": [0.5]})},
        states={"fraud": (9, state)},
    )
    assert copy.revision == 6
    assert await store.restore(7, [], {}, copy, who="restore:x", reason="lost") is True
    assert await store.revision() == 7
    assert await store.rollouts() == {"fraud": (6, template), "risk": (1, now)}
    assert await store.rollout_states() == {"fraud": (9, state)}
    decided = {**state, "decision": "approved"}
    assert await store.put_rollout_state("fraud", decided, expected=9) == 10
    # a second replica, behind no more, changes nothing
    again = RolloutCopy(states={"fraud": (3, state)})
    assert await replicas.open().restore(7, [], {}, again, who="late", reason="lost") is False
    assert await store.rollout_states() == {"fraud": (10, decided)}


async def test_stats_add_up_exactly_under_concurrency(replicas: Replicas) -> None:
    rng = np.random.default_rng(7)
    keys = [(m, r, v) for m in ("fraud", "risk") for r in (1, 2) for v in ("1", "2", "3")]
    per_replica = []
    for _ in range(3):
        deltas = []
        for _ in range(1000):
            key = keys[int(rng.integers(len(keys)))]
            rewards = int(rng.integers(0, 4))
            values = rng.normal(0.5, 1.0, rewards)
            delta = ArmStats(
                int(rng.integers(0, 10)),
                rewards,
                float(values.sum()),
                float((values**2).sum()),
            )
            deltas.append({key: delta})
        per_replica.append(deltas)

    async def replica(
        store: StateStore, deltas: list[dict[tuple[str, int, str], ArmStats]]
    ) -> None:
        await asyncio.gather(*(store.add_stats(d, batch=uuid.uuid4().hex) for d in deltas))

    await asyncio.gather(*(replica(replicas.open(), d) for d in per_replica))

    reader = replicas.open()
    for model, revision, version in keys:
        mine = [
            d[k] for ds in per_replica for d in ds for k in d if k == (model, revision, version)
        ]
        got = (await reader.stats(model, revision))[version]
        assert got.served == sum(d.served for d in mine)
        assert got.rewards == sum(d.rewards for d in mine)
        # ~250 deltas per key, Σ|x| ≲ 1e3: summation error ≲ n·eps·Σ|x| ≈ 6e-11, so 1e-9 is safe
        assert math.isclose(got.reward_sum, math.fsum(d.reward_sum for d in mine), abs_tol=1e-9)
        assert math.isclose(got.reward_sumsq, math.fsum(d.reward_sumsq for d in mine), abs_tol=1e-9)
    assert await reader.stats("fraud", 99) == {}


async def test_stats_are_kept_per_model_and_revision(store: StateStore) -> None:
    await store.add_stats(
        {
            ("fraud", 1, "1"): ArmStats(served=3),
            ("fraud", 2, "1"): ArmStats(served=5, rewards=1, reward_sum=1.5, reward_sumsq=2.25),
            ("risk", 1, "1"): ArmStats(served=7),
        },
        batch="a",
    )
    await store.add_stats({("fraud", 2, "1"): ArmStats(served=1, rewards=1, reward_sum=0.5)}, "b")
    assert await store.stats("fraud", 1) == {"1": ArmStats(served=3)}
    assert await store.stats("fraud", 2) == {"1": ArmStats(6, 2, 2.0, 2.25)}
    assert await store.stats("risk", 1) == {"1": ArmStats(served=7)}
    assert ArmStats(1, 2, 0.5, 0.25) + ArmStats(1, 0, 0.25, 0.0) == ArmStats(2, 2, 0.75, 0.25)


async def test_a_stats_batch_sent_again_counts_once(replicas: Replicas) -> None:
    first, second = replicas.open(), replicas.open()
    batch = {("fraud", 1, "1"): ArmStats(2, 1, 0.5, 0.25), ("fraud", 1, "2"): ArmStats(served=1)}
    await first.add_stats(batch, batch="in-doubt")
    await first.add_stats(batch, batch="in-doubt")  # the resend of a write that timed out
    await second.add_stats(batch, batch="in-doubt")  # ids are fleet-wide
    await second.add_stats(batch, batch="next")
    assert await first.stats("fraud", 1) == {"1": ArmStats(4, 2, 1.0, 0.5), "2": ArmStats(2)}


async def test_assignments_are_recalled_until_they_expire(store: StateStore) -> None:
    served = Assignment("fraud", "2", 7, 0.05)
    await store.remember({"req-1": served, "req-2": Assignment("fraud", "1", 7, 0.95)}, ttl_s=0.2)
    await store.remember({"req-3": served}, ttl_s=30.0)
    assert await store.recall("req-1") == served
    assert await store.recall("req-2") == Assignment("fraud", "1", 7, 0.95)
    assert await store.recall("unknown") is None
    await asyncio.sleep(0.35)
    assert await store.recall("req-1") is None
    assert await store.recall("req-2") is None
    assert await store.recall("req-3") == served


async def test_of_concurrent_claims_on_one_id_exactly_one_is_taken_and_counted(
    replicas: Replicas,
) -> None:
    handles = [replicas.open() for _ in range(4)]
    served = Assignment("fraud", "2", 7, 0.5)
    rewards = [i / 20 for i in range(20)]
    results = await asyncio.gather(
        *(handles[i % 4].claim("req-1", served, r, ttl_s=30.0) for i, r in enumerate(rewards))
    )
    (won,) = [r for r, taken in zip(rewards, results, strict=True) if taken is None]
    assert [taken for taken in results if taken is not None] == [won] * 19
    assert await handles[0].claim("req-1", served, won, ttl_s=30.0) == won
    stats = await handles[1].stats("fraud", 7)
    assert list(stats) == ["2"] and (stats["2"].served, stats["2"].rewards) == (0, 1)
    # Redis adds floats in long double and prints them back: equal to the last bits only
    assert (stats["2"].reward_sum, stats["2"].reward_sumsq) == pytest.approx((won, won * won))


async def test_a_claim_lasts_the_feedback_window(replicas: Replicas) -> None:
    store = replicas.open()
    served = Assignment("fraud", "1", 3, 1.0)
    assert await store.claim("req-1", served, 1.0, ttl_s=0.2) is None
    assert await store.claim("req-1", served, 0.0, ttl_s=0.2) == 1.0
    await asyncio.sleep(0.35)  # the assignment it joined is gone by now too
    assert await store.claim("req-1", served, 0.0, ttl_s=0.2) is None


async def test_redis_keys_of_an_inference_id_expire_with_the_feedback_window() -> None:
    prefix = f"turnout-test-{uuid.uuid4().hex}:"
    store, raw = RedisStore(REDIS_URL, prefix), Redis.from_url(REDIS_URL)
    try:
        if not await store.ping():
            pytest.skip(f"Redis is not reachable at {REDIS_URL}")
        served = Assignment("fraud", "1", 3, 1.0)
        await store.remember({"req-1": served}, ttl_s=3600.0)
        await store.claim("req-1", served, 1.0, ttl_s=3600.0)
        for key in ("assign:req-1", "reward:req-1"):
            assert 3_500_000 < await raw.pttl(prefix + key) <= 3_600_000, key
    finally:
        await flush_prefix(REDIS_URL, prefix)
        await raw.aclose()
        await store.close()


async def follow(store: StateStore, seen: asyncio.Queue[tuple[int, float]]) -> None:
    async for revision in store.watch():
        seen.put_nowait((revision, time.monotonic()))


async def test_watch_yields_within_a_second_of_a_put_by_another_instance(
    replicas: Replicas,
) -> None:
    watcher, writer = replicas.open(), replicas.open()
    seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    task = asyncio.create_task(follow(watcher, seen))
    try:
        assert (await asyncio.wait_for(seen.get(), 2.0))[0] == 0  # the current revision first
        for expected in (1, 2):
            start = time.monotonic()
            await put(writer, "fraud", CANARY | {"weight": 0.1 * expected})
            revision, at = await asyncio.wait_for(seen.get(), 2.0)
            assert revision == expected
            assert at - start < 1.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_watch_ends_when_the_store_closes(store: StateStore) -> None:
    seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    task = asyncio.create_task(follow(store, seen))
    await asyncio.wait_for(seen.get(), 2.0)
    await store.close()
    await asyncio.wait_for(task, 3.0)


async def test_concurrent_if_match_writers_exactly_one_wins(replicas: Replicas) -> None:
    created = await put(replicas.open(), "fraud", CANARY)
    writers = [replicas.open() for _ in range(6)]
    results = await asyncio.gather(
        *(
            put(w, "fraud", CANARY | {"weight": i / 10}, expected=created.revision)
            for i, w in enumerate(writers)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, StaleRevision) and r.current == 2 for r in losers)
    assert winners[0].revision == 2
    assert len(await writers[0].audit("fraud")) == 2


DEAD_CALLS: dict[str, Callable[[StateStore], Awaitable[object]]] = {
    "routes": lambda s: s.routes(),
    "revision": lambda s: s.revision(),
    "put_route": lambda s: put(s, "fraud", CANARY),
    "delete": lambda s: put(s, "fraud", None, expected=3),
    "audit": lambda s: s.audit(),
    "audit_model": lambda s: s.audit("fraud", limit=5),
    "add_stats": lambda s: s.add_stats({("fraud", 1, "1"): ArmStats(served=1)}, "b"),
    "stats": lambda s: s.stats("fraud", 1),
    "remember": lambda s: s.remember({"r": Assignment("fraud", "1", 1, 1.0)}, 1.0),
    "recall": lambda s: s.recall("r"),
    "claim": lambda s: s.claim("r", Assignment("fraud", "1", 1, 1.0), 1.0, 1.0),
}


@pytest.mark.parametrize("call", DEAD_CALLS.values(), ids=DEAD_CALLS.keys())
async def test_unreachable_redis_raises_store_unavailable_quickly(
    call: Callable[[StateStore], Awaitable[object]],
) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix=f"turnout-test-{uuid.uuid4().hex}:")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call(store)
    assert await store.ping() is False
    assert time.monotonic() - start < 2.0
    await store.close()


async def until_up(store: StateStore) -> None:
    deadline = time.monotonic() + 5.0
    while not await store.ping():
        assert time.monotonic() < deadline, "private redis-server did not start"
        await asyncio.sleep(0.02)


async def test_watch_survives_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    url = server.url
    watcher, writer = RedisStore(url, reconcile_s=0.2), RedisStore(url)
    seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    task: asyncio.Task[None] | None = None
    try:
        with server:
            await until_up(writer)
            task = asyncio.create_task(follow(watcher, seen))
            assert (await asyncio.wait_for(seen.get(), 2.0))[0] == 0
            await put(writer, "fraud", CANARY)
            assert (await asyncio.wait_for(seen.get(), 2.0))[0] == 1
        with pytest.raises(StoreUnavailable):
            await put(writer, "fraud", CANARY)
        with server:  # a fresh server without persistence: revision 0 again
            await until_up(writer)
            # once back the watcher yields the revision again (backoff capped at 0.5 s)
            assert (await asyncio.wait_for(seen.get(), 2.0))[0] == 0
            await put(writer, "risk", CANARY)
            assert (await asyncio.wait_for(seen.get(), 2.0))[0] == 1
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await watcher.close()
        await writer.close()


async def test_published_counts_are_read_back_by_prefix_and_expire(store: StateStore) -> None:
    await store.publish_counts("host-a:1:11", {"fraud/1": b"\x00\x01", "traffic": b"{}"}, ttl_s=0.3)
    await store.publish_counts("host-a:1:12", {"fraud/1": b"\x02"}, ttl_s=5.0)
    await store.publish_counts("host-b:7:70", {"fraud/1": b"\x03"}, ttl_s=5.0)
    group = await store.read_counts("host-a:1:")
    assert group == {
        "host-a:1:11": {"fraud/1": b"\x00\x01", "traffic": b"{}"},
        "host-a:1:12": {"fraud/1": b"\x02"},
    }
    assert set(await store.read_counts()) == {"host-a:1:11", "host-a:1:12", "host-b:7:70"}
    await store.publish_counts(
        "host-a:1:12", {"risk/1": b"\x04"}, ttl_s=5.0
    )  # replaces, not merges
    await asyncio.sleep(0.4)
    assert await store.read_counts("host-a:") == {"host-a:1:12": {"risk/1": b"\x04"}}


async def test_published_counts_are_read_by_field(store: StateStore) -> None:
    """A small fact (what each process serves) is read without every member's whole publish."""
    await store.publish_counts("host-a:1:11", {"ready": b"[]", "traffic": b"{}"}, ttl_s=5.0)
    await store.publish_counts("host-b:7:70", {"traffic": b"{}"}, ttl_s=5.0)  # an older gateway
    assert await store.read_counts(fields=("ready",)) == {"host-a:1:11": {"ready": b"[]"}}
    both = await store.read_counts("host-a:", ("ready", "traffic"))
    assert both == {"host-a:1:11": {"ready": b"[]", "traffic": b"{}"}}
    assert set(await store.read_counts()) == {"host-a:1:11", "host-b:7:70"}  # nobody forgotten


async def test_a_change_that_timed_out_on_a_hung_redis_is_not_applied_when_it_resumes(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, timeout_s=0.3)
        try:
            await put(store, "fraud", CANARY)
            server.pause()  # hung: the command reaches its socket and waits there
            with pytest.raises(StoreUnavailable):
                await put(store, "fraud", None, expected=1, reason="during the outage")
            await asyncio.sleep(0.3)  # resumed well after the caller was told it failed
            server.resume()
            await until_up(store)
            assert (await store.routes())[1]["fraud"].doc == CANARY
            assert [e.revision for e in await store.audit()] == [1]
            # a timely write still applies: the deadline refuses late writes only
            assert (await put(store, "fraud", CANARY, expected=1)).revision == 2
        finally:
            await store.close()


async def test_a_claim_that_timed_out_on_a_hung_redis_counts_once_when_retried(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, timeout_s=0.3)
        served = Assignment("fraud", "2", 1, 0.5)
        try:
            # loads the script: the call on the hung server is then one EVALSHA that runs late
            await store.claim("warm-up", Assignment("fraud", "2", 2, 0.5), 1.0, ttl_s=30.0)
            server.pause()
            with pytest.raises(StoreUnavailable):
                await store.claim("req-1", served, 1.0, ttl_s=30.0)  # in doubt: runs on resume
            server.resume()
            await until_up(store)
            assert await store.claim("req-1", served, 1.0, ttl_s=30.0) == 1.0  # the retry
            assert await store.stats("fraud", 1) == {"2": ArmStats(0, 1, 1.0, 1.0)}
        finally:
            await store.close()


async def test_a_stats_batch_resent_after_a_hung_redis_resumes_counts_once(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, timeout_s=0.3)
        batch = {("fraud", 1, "2"): ArmStats(served=5, rewards=2, reward_sum=1.0)}
        try:
            server.pause()
            with pytest.raises(StoreUnavailable):
                await store.add_stats(batch, batch="b1")  # in doubt: runs when Redis resumes
            server.resume()
            await until_up(store)
            await store.add_stats(batch, batch="b1")  # the caller resends it
            assert await store.stats("fraud", 1) == {"2": ArmStats(5, 2, 1.0, 0.0)}
        finally:
            await store.close()
