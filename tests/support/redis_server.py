"""A redis-server of a test's own on a free port, without persistence: tests may pause it
(a hung Redis), stop it and start it again (a restart that lost everything)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from router.state.redis_store import RedisStore
from tests.support.server import free_port

__all__ = ["RedisServer"]


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence, so a test may
    pause it (SIGSTOP: a hung Redis, every command times out) without touching a shared one."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                raise RuntimeError("redis-server is not installed")
            pytest.skip("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", str(self.port), "--save", "", "--appendonly", "no"]
        cmd += ["--daemonize", "no", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.ping():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def fresh_prefix(url: str) -> str:
    """A key prefix no other test uses, once the Redis at ``url`` answers: the test is skipped
    on a laptop without Redis and fails under CI=true."""
    prefix = f"turnout-test-{uuid.uuid4().hex}:"
    probe = RedisStore(url, prefix)
    reachable = await probe.ping()
    await probe.close()
    if not reachable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is not reachable at {url} (CI=true)")
        pytest.skip(f"Redis is not reachable at {url}")
    return prefix


async def flush_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (what a Redis restarted empty holds of a test's state,
    without restarting the server the other tests share); the number deleted."""
    client = AsyncRedis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        return int(await client.delete(*keys)) if keys else 0
    finally:
        await client.aclose()
