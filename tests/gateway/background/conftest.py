from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.serving.loader import version_loader
from gateway.serving.registry import Registry
from gateway.settings import Settings
from tests.support.server import reference_cache


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fraud_repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("background") / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    return root


@pytest.fixture
async def registry(fraud_repo: Path) -> AsyncIterator[Registry]:
    """The demo's fraud versions loaded as a gateway loads them, without a gateway."""
    settings = Settings(model_repository=fraud_repo, cache_dir=reference_cache())
    executor = ThreadPoolExecutor(2)
    registry = Registry(fraud_repo, version_loader(settings, executor, lambda: False))
    await registry.load_all()
    try:
        yield registry
    finally:
        await registry.close()
        executor.shutdown()
