from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.demo import write_demo_repository
from tests.support.server import InProcessServer

REDIS_URL = "redis://127.0.0.1:6379/0"  # the CI machine's Redis
SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/system runs real processes: mark it so a tier can leave it out."""
    for item in items:
        if SYSTEM in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo") / "models"
    write_demo_repository(root, heavy=False)
    return root


@pytest.fixture(scope="session")
def server(demo_repo: Path) -> Iterator[InProcessServer]:
    """One gateway on the demo repository, shared by tests that do not change its state."""
    with InProcessServer(demo_repo) as s:
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
