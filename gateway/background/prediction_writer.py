"""The prediction log's writer process. The records' encoding (the JSON text of every number)
and the sink (gzip and files, or CloudEvents over HTTP) run in a child process, so they never
hold the gateway's GIL: the gateway's writer thread only packs each period's records (columns,
arrays concatenated: gateway.background.prediction_records) and sends the batch as one pickle
over a socket. With a core to spare the encoding runs beside the event loop; on one core it
still takes its CPU (docs/benchmarks.md has both).

One message at a time, each answered: ``("write", batch)`` -> the bytes written, ``("tick",
now)``, ``("close", None)``. The child seals its open file and ends when its socket closes (the
gateway stopped or died). A child that died is started again at the next call, at most once
per ``RESTART_S``; the batch it had is counted as dropped, like any sink failure.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.background.prediction_records import Batch
from gateway.background.predictions import Sink, SinkError

log = logging.getLogger("turnout.predictions")

RESTART_S = 5.0
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds ``gateway``


class WriterProcess:
    """A ``Sink`` that runs the sink ``make()`` builds in a child process. ``make`` must pickle
    (a sink class with its arguments: ``functools.partial``). Writer thread only."""

    def __init__(self, make: Callable[[], Sink], *, restart_s: float = RESTART_S) -> None:
        self.make = make
        self.restart_s = restart_s
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._next_start = 0.0

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (to pin it to a CPU, say)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the child now rather than at the first batch; SinkError if it cannot."""
        if self._conn is None:
            self._start()

    def write(self, batch: Batch) -> int:
        return int(self._call("write", batch))

    def tick(self, now: float) -> None:
        if self._conn is None and time.monotonic() < self._next_start:
            return  # down: the next write says so (and counts its records)
        self._call("tick", now)

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self._call("close", None)
        finally:
            self._end()

    def _call(self, kind: str, value: Any) -> Any:
        conn = self._conn if self._conn is not None else self._start()
        try:
            conn.send_bytes(pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL))
            ok, answer = pickle.loads(conn.recv_bytes())
        except (OSError, EOFError):
            code = self._end()
            raise SinkError(f"the prediction log's writer process ended (exit {code})") from None
        if not ok:
            raise SinkError(answer)
        return answer

    def _start(self) -> Connection:
        if time.monotonic() < self._next_start:
            raise SinkError("the prediction log's writer process is down (restarted soon)")
        self._next_start = time.monotonic() + self.restart_s
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env={**os.environ, "PYTHONPATH": path},
            )
        self._conn = Connection(ours.detach())
        try:
            self._call("make", self.make)
        except SinkError:
            self._end()
            raise
        return self._conn

    def _end(self) -> int | None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def serve(conn: Connection) -> None:
    """The child's loop: build the sink, then answer each message until ``close`` or EOF."""
    sink: Sink | None = None
    try:
        while True:
            try:
                kind, value = pickle.loads(conn.recv_bytes())
            except EOFError:
                return  # the gateway is gone: seal what was written
            if kind == "close":
                break
            try:
                if kind == "make":
                    sink = value()
                    answer: tuple[bool, Any] = (True, None)
                elif sink is None:
                    answer = (False, "no sink")
                elif kind == "write":
                    answer = (True, sink.write(value))
                else:
                    sink.tick(value)
                    answer = (True, None)
            except Exception as exc:
                log.exception("prediction log writer: %s failed", kind)
                answer = (False, f"{type(exc).__name__}: {exc}")
            conn.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        if sink is not None:
            sink.close()
    conn.send_bytes(pickle.dumps((True, None)))


if __name__ == "__main__":
    for number in (signal.SIGINT, signal.SIGTERM):  # the gateway stops it, after its last batch
        signal.signal(number, signal.SIG_IGN)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Connection(int(sys.argv[1])))
