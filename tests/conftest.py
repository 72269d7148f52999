from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo import write_demo_repository
from tests.server import Server


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
