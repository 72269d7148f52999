"""The state store's lease (one guard evaluator across a fleet), against both stores."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from router.state.redis_store import RedisStore
from router.state.store import StateStore, StoreUnavailable

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
TTL_S = 0.3
# Sleeping this long past a deadline leaves room for a loaded machine's scheduling delays.
MARGIN_S = 0.2


async def test_a_free_lease_is_taken_and_refused_to_others_until_it_expires(
    handles: Callable[[], StateStore],
) -> None:
    a, b = handles(), handles()
    assert await a.acquire_lease("guards", "a", TTL_S)
    assert not await b.acquire_lease("guards", "b", TTL_S)
    assert await a.acquire_lease("guards", "a", TTL_S)  # the holder renews
    await asyncio.sleep(TTL_S + MARGIN_S)
    assert await b.acquire_lease("guards", "b", TTL_S)
    assert not await a.acquire_lease("guards", "a", TTL_S)


async def test_renewing_extends_the_lease_from_now(handles: Callable[[], StateStore]) -> None:
    a, b = handles(), handles()
    assert await a.acquire_lease("guards", "a", 2 * TTL_S)
    await asyncio.sleep(TTL_S)
    assert await a.acquire_lease("guards", "a", 2 * TTL_S)
    await asyncio.sleep(TTL_S + MARGIN_S / 2)  # past the first deadline, before the renewed one
    assert not await b.acquire_lease("guards", "b", TTL_S)


async def test_leases_of_different_names_are_independent(
    handles: Callable[[], StateStore],
) -> None:
    a, b = handles(), handles()
    assert await a.acquire_lease("guards", "a", TTL_S)
    assert await b.acquire_lease("other", "b", TTL_S)
    assert not await b.acquire_lease("guards", "b", TTL_S)


async def test_exactly_one_of_many_concurrent_contenders_wins(
    handles: Callable[[], StateStore],
) -> None:
    stores = [handles() for _ in range(8)]
    won = await asyncio.gather(
        *(s.acquire_lease("guards", f"holder-{i}", 5.0) for i, s in enumerate(stores))
    )
    assert sum(won) == 1


async def test_an_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    with pytest.raises(StoreUnavailable):
        await store.acquire_lease("guards", "a", TTL_S)
    await store.close()
