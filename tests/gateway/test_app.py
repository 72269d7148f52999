"""The composition root (gateway.app): which store a gateway's settings choose."""

from __future__ import annotations

import pytest

from gateway.app import open_store
from router.state.redis_store import RedisStore
from router.state.store import MemoryStore
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_open_store_chooses_the_implementation() -> None:
    for url, kind in ((None, MemoryStore), ("", MemoryStore), (REDIS_URL, RedisStore)):
        store = open_store(url, prefix="turnout-test-unused:")
        assert isinstance(store, kind)
        await store.close()
