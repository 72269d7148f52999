"""An HTTP sink for tests: a real server on a thread that keeps what is POSTed to it."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Receiver(http.server.ThreadingHTTPServer):
    """Keeps each POST as (content type, body); answers ``status``; waits for ``release``
    first when it is cleared (a sink that blocks). ``arrived`` is set by the first POST."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.status = 200
        self.release = threading.Event()
        self.release.set()
        self.arrived = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.arrived.set()
                receiver.release.wait(30)
                receiver.bodies.append((self.headers["content-type"], body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/events"


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A running Receiver, stopped (and released) afterwards."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
