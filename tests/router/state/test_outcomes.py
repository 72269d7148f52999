"""The outcome join's stores, in memory and on real Redis: one label per id (same again: a
duplicate; another: a conflict), unknown and expired ids told apart, the horizon as a TTL in
Redis, and the in-process store's caps. Time is passed in (``at``, ``now``): no sleeps."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from router.state import outcomes
from router.state.join import MAX_ID_CHARS
from router.state.outcomes import (
    CLAIM_CHUNK,
    ENTRY_BYTES,
    GRACE_SHARE,
    Claimed,
    MemoryPredictions,
    PredictionStore,
    Served,
)
from router.state.redis_outcomes import RedisPredictions
from router.state.store import StoreUnavailable
from tests.support.memory import held_by
from tests.support.redis_server import flush_prefix, fresh_prefix

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
HORIZON_S = 3600.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[PredictionStore]:
    if request.param == "memory":
        yield MemoryPredictions(HORIZON_S, 1_000_000, 1 << 30)
        return
    prefix = await fresh_prefix(REDIS_URL)
    redis_store = RedisPredictions(REDIS_URL, prefix, HORIZON_S)
    yield redis_store
    await redis_store.close()
    await flush_prefix(REDIS_URL, prefix)


async def test_a_label_joins_the_prediction_once(store: PredictionStore) -> None:
    now = time.time()
    await store.remember(
        [Served("fraud", "a", "1", 0.25, now), Served("fraud", "b", "2", 0.75, now)]
    )
    first = await store.claim("fraud", [("a", 1.0), ("b", 0.0), ("c", 1.0)], now)
    assert first == [Claimed("accepted", "1", 0.25), Claimed("accepted", "2", 0.75),
                     Claimed("unknown")]  # fmt: skip
    again = await store.claim("fraud", [("a", 1.0), ("b", 1.0), ("a", 0.0)], now)
    assert [c.result for c in again] == ["duplicate", "conflict", "conflict"]
    # the id of another model is another prediction
    assert await store.claim("other", [("a", 1.0)], now) == [Claimed("unknown")]


async def test_one_id_twice_in_a_batch_takes_the_first_label(store: PredictionStore) -> None:
    now = time.time()
    await store.remember([Served("fraud", "x", "1", 0.5, now)])
    claims = await store.claim("fraud", [("x", 1.0), ("x", 1.0), ("x", 0.0)], now)
    assert [c.result for c in claims] == ["accepted", "duplicate", "conflict"]


async def test_past_the_horizon_expired_then_gone(store: PredictionStore) -> None:
    now = time.time()
    await store.remember(
        [
            Served("fraud", "young", "1", 0.1, now - HORIZON_S + 60),
            Served("fraud", "old", "1", 0.1, now - HORIZON_S - 60),
        ]
    )
    claims = await store.claim("fraud", [("young", 0.0), ("old", 0.0)], now)
    assert [c.result for c in claims] == ["accepted", "expired"]
    if isinstance(store, MemoryPredictions):  # past the grace too: forgotten
        later = now + GRACE_SHARE * HORIZON_S  # old's grace is over, young's is not
        assert (await store.claim("fraud", [("old", 0.0)], later))[0].result == "unknown"
        assert store.evictions == {"entries": 0, "bytes": 0}  # expiry is no eviction


async def test_redis_keeps_a_prediction_for_the_horizon_and_its_grace() -> None:
    prefix = await fresh_prefix(REDIS_URL)
    store = RedisPredictions(REDIS_URL, prefix, HORIZON_S)
    raw = Redis.from_url(REDIS_URL)
    try:
        await store.remember([Served("fraud", "id-1", "2", 0.5, time.time())])
        ttl_ms = await raw.pttl(f"{prefix}outcome:fraud:id-1")
        keep_ms = HORIZON_S * (1 + GRACE_SHARE) * 1000
        assert keep_ms - 5000 < ttl_ms <= keep_ms
        # a label keeps the TTL: the record still leaves with the horizon
        await store.claim("fraud", [("id-1", 1.0)], time.time())
        assert 0 < await raw.pttl(f"{prefix}outcome:fraud:id-1") <= keep_ms
    finally:
        await store.close()
        await flush_prefix(REDIS_URL, prefix)
        await raw.aclose()


async def test_a_batch_longer_than_one_script_is_claimed_in_order(store: PredictionStore) -> None:
    now = time.time()
    n = CLAIM_CHUNK * 2 + 7
    await store.remember([Served("fraud", f"id-{i}", "1", i / n, now) for i in range(0, n, 2)])
    claims = await store.claim("fraud", [(f"id-{i}", float(i % 2)) for i in range(n)], now)
    assert [c.result for c in claims] == ["accepted" if i % 2 == 0 else "unknown" for i in range(n)]
    assert [c.value for c in claims[:4:2]] == [0.0, 2 / n]


async def test_served_again_keeps_the_label_it_took(store: PredictionStore) -> None:
    now = time.time()
    await store.remember([Served("fraud", "r", "1", 0.2, now)])
    assert (await store.claim("fraud", [("r", 1.0)], now))[0].result == "accepted"
    await store.remember([Served("fraud", "r", "2", 0.9, now)])
    assert (await store.claim("fraud", [("r", 0.0)], now))[0].result == "conflict"


async def test_the_memory_join_is_bounded_by_entries_and_bytes() -> None:
    store = MemoryPredictions(HORIZON_S, max_entries=100, max_bytes=1 << 30)
    now = time.time()
    await store.remember([Served("m", f"e{i}", "1", 0.5, now) for i in range(250)])
    assert store.entries == 100 and store.evictions == {"entries": 150, "bytes": 0}
    # the oldest went first
    claims = await store.claim("m", [("e149", 1.0), ("e150", 1.0)], now)
    assert [c.result for c in claims] == ["unknown", "accepted"]

    one = sys.getsizeof("0" * MAX_ID_CHARS) + ENTRY_BYTES
    cap = 500 * one + one // 2
    store = MemoryPredictions(HORIZON_S, max_entries=1_000_000, max_bytes=cap)
    with held_by(outcomes.__file__, __file__) as held:
        # ids of the largest size the gateway accepts, as the request path hands them over
        served = [Served("m", f"{i:0{MAX_ID_CHARS}d}", "1", 0.5, now) for i in range(2000)]
        await store.remember(served)
        del served
    assert store.entries == 500 and store.bytes == 500 * one <= cap
    assert store.evictions["bytes"] == 1500
    # the estimate is what the join really holds (tracemalloc), within 10 %
    assert abs(held.bytes - store.bytes) < 0.1 * store.bytes, (held, store.bytes)


async def test_redis_down_is_store_unavailable() -> None:
    store = RedisPredictions("redis://127.0.0.1:1/0", "nowhere:", HORIZON_S, timeout_s=0.2)
    with pytest.raises(StoreUnavailable):
        await store.remember([Served("m", "a", "1", 0.5, time.time())])
    with pytest.raises(StoreUnavailable):
        await store.claim("m", [("a", 1.0)], time.time())
    await store.close()


async def test_a_redis_emptied_forgets_its_predictions_and_labels() -> None:
    """Redis restarted empty: labels for predictions served before it are answered ``unknown``
    (lost: docs/reliability.md), a label taken before it is not taken twice, and predictions
    served after it join as ever."""
    prefix = await fresh_prefix(REDIS_URL)
    store = RedisPredictions(REDIS_URL, prefix, HORIZON_S)
    now = time.time()
    try:
        await store.remember(
            [Served("fraud", "a", "1", 0.2, now), Served("fraud", "b", "1", 0.8, now)]
        )
        assert [c.result for c in await store.claim("fraud", [("a", 1.0)], now)] == ["accepted"]
        assert await flush_prefix(REDIS_URL, prefix) == 2
        again = await store.claim("fraud", [("a", 1.0), ("b", 0.0)], now)
        assert [c.result for c in again] == ["unknown", "unknown"]
        await store.remember([Served("fraud", "c", "2", 0.6, now)])
        assert await store.claim("fraud", [("c", 1.0)], now) == [Claimed("accepted", "2", 0.6)]
    finally:
        await store.close()
        await flush_prefix(REDIS_URL, prefix)
