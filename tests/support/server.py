"""Gateways for tests and benchmarks, on a free port, configured as ``turnout serve`` would be.

``InProcessServer`` runs the app in a uvicorn server on a thread of the test process: no
interpreter start and no imports, kernels already warm, about half a second to a ready
gateway. It is the default. ``Server`` starts ``python -m gateway serve`` as a process of its
own, for behaviour only a process has: signals, workers, crashes, exit codes, several hosts.
Both answer the same HTTP on ``.url`` and take the same arguments (CLI flags and ``TURNOUT_*``
variables). Both shorten the background loops' periods (``TEST_PERIODS``) so that tests wait
on conditions (``until``) rather than on production periods, and keep reference outputs in one
cache directory per test process.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import httpx
import uvicorn

from gateway.app import create_app
from gateway.cli import serve_settings, server_options

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Background periods for tests; a test that needs production periods passes its own values.
TEST_PERIODS = {
    "TURNOUT_FLUSH_S": "0.05",
    "TURNOUT_GUARD_TICK_S": "0.05",
    "TURNOUT_LEASE_TTL_S": "0.5",
    "TURNOUT_PUBLISH_S": "0.1",
    "TURNOUT_EVENTS_TICK_S": "0.05",
    "TURNOUT_DRIFT_EVENTS_S": "0.1",
}
_CACHE: list[Path] = []


class GatewayServer(Protocol):
    """What tests use of a running gateway, in process or not."""

    url: str
    port: int
    repository: Path

    def log(self) -> str: ...


def reference_cache() -> Path:
    """One directory per test process for reference outputs (``--cache-dir``)."""
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="turnout-test-cache-")))
    return _CACHE[0]


def until(
    condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02
) -> float:
    """Wait until ``condition()`` is truthy; the seconds it took. AssertionError on timeout,
    with the condition's last value, so a test never sleeps for a fixed time."""
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s: {condition!r} -> {value!r}")
        time.sleep(interval_s)


def ready_workers(server: GatewayServer) -> int:
    """Processes of a gateway (its workers, replacements included) that have finished loading,
    from its log: one line each."""
    return len(re.findall(r"turnout INFO ready: \d+ model versions loaded", server.log()))


def _serve_args(repository: Path, port: int, args: Sequence[str]) -> list[str]:
    cache = [] if "--cache-dir" in args else ["--cache-dir", str(reference_cache())]
    return [
        "--model-repository", str(repository),
        "--port", str(port),
        "--admin-token", f"tester={ADMIN_TOKEN}",
        *cache,
        *args,
    ]  # fmt: skip


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """The process environment without ``TURNOUT_*`` variables, test periods, then ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    return {**base, **TEST_PERIODS, **(env or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A gateway process. ``with Server(repo) as s:`` waits until it reports ready."""

    def __init__(
        self,
        repository: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 90.0,
        wait_ready: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repository = repository
        self.args = list(args)
        self.env = _environment(env)
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = repository.parent / f"gateway-{self.port}.log"

    def start(self) -> Server:
        cmd = [
            sys.executable, "-m", "gateway", "serve",
            *_serve_args(self.repository, self.port, self.args),
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {self.ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Records(logging.Handler):
    """Log records emitted on one thread (an in-process gateway's event loop)."""

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__(logging.DEBUG)
        self.thread = thread
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread.ident:
            self.lines.append(self.format(record))


class InProcessServer:
    """A gateway in this process: ``with InProcessServer(repo) as s:`` waits until it is ready.

    The app and uvicorn are configured exactly as by ``turnout serve`` (gateway.cli), with one
    worker and the process's logging left alone. ``log()`` holds what the gateway logged on its
    event loop thread. Stopping it unfreezes the collector (the app freezes what it loaded) and
    collects, so that many gateways in one test process do not accumulate."""

    def __init__(
        self,
        repository: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 60.0,
        wait_ready: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repository = repository
        environ = {k: v for k, v in _environment(env).items() if k.startswith("TURNOUT_")}
        self.settings = serve_settings(_serve_args(repository, self.port, args), environ)
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._records: _Records | None = None

    def start(self) -> InProcessServer:
        config = uvicorn.Config(
            create_app(self.settings), **server_options(self.settings), log_config=None
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name=f"gateway-{self.port}", daemon=True
        )
        self._thread.start()
        self._records = _Records(self._thread)
        logging.getLogger().addHandler(self._records)
        logging.getLogger("turnout").setLevel(logging.INFO)
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        assert self._thread is not None
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError(f"gateway stopped before it was ready:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"gateway not ready after {self.ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return "\n".join(self._records.lines) if self._records is not None else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"in-process gateway did not stop within {timeout} s")
        if self._records is not None:
            logging.getLogger().removeHandler(self._records)
        gc.unfreeze()
        gc.collect()

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
