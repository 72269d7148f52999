"""The feedback join and rewards through RouteTable, on the memory store (one process: the join
alone) and on real Redis (replicas: the store takes each id's one reward): one reward per id,
rewards in the policy's range, the join's bounds and its release at a policy change. No server,
no sleeps: flush and refresh are called directly, as the table's own tasks call them."""

from __future__ import annotations

import asyncio
import math
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from router.policy.policies import PolicyError
from router.policy.spec import PolicyDoc, parse_policy
from router.state import join
from router.state import table as table_module
from router.state.join import ENTRY_BYTES, MAX_ID_CHARS, id_bytes
from router.state.redis_store import RedisStore
from router.state.store import MemoryStore, StoreUnavailable
from router.state.table import RewardConflict, RouteTable, UnknownInference
from tests.support.memory import held_by
from tests.support.redis_server import RedisServer, flush_prefix, fresh_prefix

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
AB = parse_policy({"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "seed": 3})
BANDIT = parse_policy({"strategy": "bandit", "arms": ["1", "2"], "seed": 1})
ARTIFACTS = {"1": "a" * 64, "2": "b" * 64}

Replica = Callable[[], RouteTable]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def replica(request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    """Makes route tables as gateway processes hold them: on the memory store, one process
    (every call gives the same table); on Redis, replicas sharing one prefix."""
    if request.param == "memory":
        table = RouteTable(MemoryStore(), shared=False)
        yield lambda: table
        return
    prefix = await fresh_prefix(REDIS_URL)
    tables: list[RouteTable] = []

    def make() -> RouteTable:
        tables.append(RouteTable(RedisStore(REDIS_URL, prefix)))
        return tables[-1]

    yield make
    for table in tables:
        await table.store.close()
    await flush_prefix(REDIS_URL, prefix)


async def write(table: RouteTable, doc: PolicyDoc | None, model: str = "fraud") -> int:
    record = await table.write(
        model, doc, expected=None, who="tester", action="put", reason="test", artifacts=ARTIFACTS
    )
    return record.revision if record is not None else 0


def serve(table: RouteTable, n: int, prefix: str = "req", model: str = "fraud") -> dict[str, str]:
    """Route and count ``n`` requests as the request path does: id -> the version chosen."""
    route = table.get(model)
    assert route is not None
    chosen = {}
    for i in range(n):
        decision = table.choose(route, {}, {})
        table.served(route, decision, f"{prefix}-{i}")
        chosen[f"{prefix}-{i}"] = decision.version
    return chosen


async def rewards(table: RouteTable, model: str = "fraud") -> dict[str, tuple[int, float]]:
    """version -> (rewards, reward sum) of the model's current revision, from the store."""
    await table.flush()
    route = table.get(model)
    assert route is not None
    stats = await table.store.stats(model, route.revision)
    return {v: (s.rewards, s.reward_sum) for v, s in stats.items() if s.rewards}


async def test_a_replayed_reward_is_a_duplicate_and_changes_nothing(replica: Replica) -> None:
    first, other = replica(), replica()
    await write(first, AB)
    await other.refresh()
    served = serve(first, 20)
    await first.flush()  # with Redis: the assignments reach the store for the other replica
    for request_id, version in served.items():
        assignment, duplicate = await first.feedback("fraud", request_id, 1.0)
        assert (assignment.version, duplicate) == (version, False)
    counted = await rewards(first)
    assert sum(n for n, _ in counted.values()) == 20
    for table in (first, other):  # the replica that served, and one that knows it from Redis
        for request_id, version in served.items():
            assignment, duplicate = await table.feedback("fraud", request_id, 1.0)
            assert (assignment.version, duplicate) == (version, True)
    assert await rewards(first) == counted


async def test_a_different_reward_for_a_rewarded_id_is_a_conflict(replica: Replica) -> None:
    first, other = replica(), replica()
    await write(first, AB)
    await other.refresh()
    serve(first, 1)
    await first.flush()
    await first.feedback("fraud", "req-0", 0.25)
    for table in (first, other):
        with pytest.raises(RewardConflict, match=r"^reward: .*'req-0' already took 0.25"):
            await table.feedback("fraud", "req-0", 0.75)
    assert sum(n for n, _ in (await rewards(first)).values()) == 1


@pytest.mark.parametrize("reward", [math.inf, -math.inf, math.nan, 1e308, -1e308, -0.01, 1.01])
async def test_a_reward_that_is_not_finite_or_outside_the_range_is_refused(
    reward: float,
) -> None:
    table = RouteTable(MemoryStore(), shared=False)
    await write(table, AB)
    serve(table, 1)
    with pytest.raises(PolicyError) as info:
        await table.feedback("fraud", "req-0", reward)
    assert info.value.field == "reward"
    assert await table.feedback("fraud", "req-0", 1.0)  # the refusal took nothing


async def test_the_policy_declares_its_reward_range() -> None:
    table = RouteTable(MemoryStore(), shared=False)
    await write(table, parse_policy({**AB.as_json(), "reward_range": [-5, 100]}))
    serve(table, 2)
    assert await table.feedback("fraud", "req-0", -5.0)
    with pytest.raises(PolicyError, match=r"^reward: must be in \[-5.0, 100.0\]"):
        await table.feedback("fraud", "req-1", 100.5)


async def test_three_hundred_replays_do_not_move_a_bandit(replica: Replica) -> None:
    table = replica()
    await write(table, BANDIT)
    served = serve(table, 200)
    await table.flush()
    arm = {v: [i for i, s in served.items() if s == v] for v in ("1", "2")}
    honest = arm["1"][:20] + arm["2"][:20]
    for request_id in honest:  # version 2 pays, version 1 never does
        await table.feedback("fraud", request_id, 1.0 if served[request_id] == "2" else 0.0)
    for _ in range(300):  # an attacker replays a reward of 1 for one answer of version 1
        await table.feedback("fraud", arm["1"][20], 1.0)
    await table.flush()
    await table.refresh()  # the bandit folds in the store's totals
    route = table.get("fraud")
    assert route is not None
    assert await rewards(table) == {"1": (21, 1.0), "2": (20, 20.0)}
    # Posteriors Beta(2, 21) for version 1 and Beta(21, 1) for version 2: a draw of version 1
    # beats one of version 2 with probability below 1e-9 (version 2 must fall under 0.4, which
    # Beta(21, 1) does with probability 0.4^21), so of the 1000 draws behind the shares none
    # goes to version 1 but with probability < 1e-6. Counted 300 times, the replays would give
    # version 1 Beta(302, 21), which wins about a quarter of the draws (measured: 0.256).
    assert route.policy.shares()["2"] == 1.0


async def test_of_two_replicas_racing_on_each_id_exactly_one_reward_is_taken() -> None:
    prefix = f"turnout-test-{uuid.uuid4().hex}:"
    a, b = RouteTable(RedisStore(REDIS_URL, prefix)), RouteTable(RedisStore(REDIS_URL, prefix))
    try:
        if not await a.store.ping():
            pytest.skip(f"Redis is not reachable at {REDIS_URL}")
        await write(a, AB)
        await b.refresh()
        served = serve(a, 50)
        await a.flush()
        outcomes = await asyncio.gather(
            *(
                asyncio.gather(
                    a.feedback("fraud", request_id, 1.0),
                    b.feedback("fraud", request_id, 0.0),
                    return_exceptions=True,
                )
                for request_id in served
            )
        )
        for pair in outcomes:
            taken = [o for o in pair if isinstance(o, tuple)]
            refused = [o for o in pair if isinstance(o, BaseException)]
            assert len(taken) == 1 and taken[0][1] is False, pair
            assert len(refused) == 1 and isinstance(refused[0], RewardConflict), pair
        assert sum(n for n, _ in (await rewards(a)).values()) == 50
    finally:
        for table in (a, b):
            await table.store.close()
        await flush_prefix(REDIS_URL, prefix)


async def test_feedback_while_redis_hangs_is_unavailable_and_counts_once_when_retried(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as server:
        table = RouteTable(RedisStore(server.url, timeout_s=0.3))
        try:
            await write(table, AB)
            serve(table, 2)
            await table.flush()
            await table.feedback("fraud", "req-1", 1.0)  # the claim script is loaded
            server.pause()
            with pytest.raises(StoreUnavailable):  # the answer is 503, not a silent drop
                await table.feedback("fraud", "req-0", 1.0)
            server.resume()
            _, duplicate = await table.feedback("fraud", "req-0", 1.0)
            assert duplicate  # the claim in doubt ran when Redis resumed: counted once
            assert sum(n for n, _ in (await rewards(table)).values()) == 2
        finally:
            await table.store.close()


async def test_the_join_holds_at_most_its_entries_evicting_the_oldest() -> None:
    table = RouteTable(MemoryStore(), shared=False, feedback_max_entries=100)
    await write(table, AB)
    serve(table, 150)
    assert (table.join.entries, table.join.evictions["entries"]) == (100, 50)
    with pytest.raises(UnknownInference):
        await table.feedback("fraud", "req-49", 1.0)
    assert await table.feedback("fraud", "req-50", 1.0)


async def test_the_join_holds_at_most_its_bytes_and_says_what_it_holds() -> None:
    cap = 1 << 20
    table = RouteTable(MemoryStore(), shared=False, feedback_max_bytes=cap)
    await write(table, AB)
    route = table.get("fraud")
    assert route is not None
    decision = table.choose(route, {}, {})
    with held_by(join.__file__, table_module.__file__, __file__) as held:
        for i in range(2000):  # 2,000 ids of the largest size the gateway accepts: 1.7 MiB
            table.served(route, decision, f"{i:0{MAX_ID_CHARS}d}")
    one = sys.getsizeof("0" * MAX_ID_CHARS) + ENTRY_BYTES
    assert table.join.bytes == table.join.entries * one <= cap < (table.join.entries + 1) * one
    assert table.join.evictions["bytes"] == 2000 - table.join.entries
    # the estimate is what the join really holds (tracemalloc), within 10 %
    assert abs(held.bytes - table.join.bytes) < 0.1 * table.join.bytes, (held, table.join.bytes)


async def test_a_new_policy_revision_frees_the_join_of_the_old_one(replica: Replica) -> None:
    writer, reader = replica(), replica()
    await write(writer, AB)
    await reader.refresh()
    for table in (writer, reader):
        serve(table, 30, prefix=f"{id(table)}")
    await writer.flush()
    await reader.flush()
    await write(writer, BANDIT)  # the writer installs it at once, the reader on refresh
    await reader.refresh()
    for table in (writer, reader):
        assert table.join.entries == table.join.bytes == 0
        assert table.join.evictions["policy"] == 30
        with pytest.raises(UnknownInference):  # 404: never, expired, evicted or replaced
            await table.feedback("fraud", f"{id(table)}-0", 1.0)
    serve(writer, 10, prefix="new")
    await write(writer, None)  # deleted: freed too
    assert writer.join.entries == 0


@pytest.mark.parametrize("request_id", ["", "a", "0" * MAX_ID_CHARS, "é" * 3, "€" * 5, "😀" * 2])
def test_an_ids_bytes_are_what_python_holds_for_it(request_id: str) -> None:
    assert id_bytes(request_id) == sys.getsizeof(request_id)
