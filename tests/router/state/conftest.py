"""Fixtures of the state-store tests: handles on one shared state, over both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from router.state.redis_store import RedisStore
from router.state.store import MemoryStore, StateStore
from tests.support.redis_server import flush_prefix, fresh_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def handles(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], StateStore]]:
    """A factory of handles on one shared state, as replicas (or a restarted one) hold them."""
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared
        await shared.close()
        return
    prefix = await fresh_prefix(REDIS_URL)
    opened: list[StateStore] = []

    def make() -> StateStore:
        opened.append(RedisStore(REDIS_URL, prefix))
        return opened[-1]

    yield make
    for store in opened:
        await store.close()
    await flush_prefix(REDIS_URL, prefix)
