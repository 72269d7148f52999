from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.demo import write_demo_repository
from tests.support.server import Server

REDIS_URL = "redis://127.0.0.1:6379/0"  # the CI machine's Redis


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo") / "models"
    write_demo_repository(root, heavy=False)
    return root


@pytest.fixture(scope="session")
def server(demo_repo: Path) -> Iterator[Server]:
    """One gateway on the demo repository, shared by tests that do not change its state."""
    with Server(demo_repo) as s:
        yield s


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix on the shared Redis, its keys deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("no Redis on 127.0.0.1:6379")
    name = f"turnout-test-{uuid.uuid4().hex[:12]}:"
    yield name
    keys = list(client.scan_iter(match=name + "*"))
    if keys:
        client.delete(*keys)
    client.close()
