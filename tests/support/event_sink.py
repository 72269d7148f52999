"""A real HTTP event sink for tests, on a free port in a thread: it checks each request's
content type and ``Turnout-Signature`` as docs/events.md tells a receiver to, and keeps the
CloudEvents it took. ``status`` is what it answers (503: an outage); ``refuse`` holds event ids
it answers 400 for (poison); ``stop()``/``start()`` take it off the network and back.
``signed`` keeps each taken event's ``(Turnout-Signature header, raw body)``, for a test that
checks the signature with a receiver's code of its own."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

import orjson

from gateway.background.events import CONTENT_TYPE, REPLAY_WINDOW_S, SIGNATURE_HEADER, verify
from tests.support.server import free_port


class EventSink:
    def __init__(self, secret: str, port: int | None = None) -> None:
        self.secret = secret.encode()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.status = 200
        self.refuse: set[str] = set()
        self.events: list[dict[str, Any]] = []  # taken (2xx answered), in arrival order
        self.signed: list[tuple[str, bytes]] = []  # the same, as received: (signature, body)
        self.attempts: list[str] = []  # every event id POSTed, whatever the answer
        self.bad: list[str] = []  # requests whose signature or content type failed
        self.lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> EventSink:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                header = self.headers.get(SIGNATURE_HEADER, "")
                ok = self.headers.get("Content-Type") == CONTENT_TYPE and verify(
                    sink.secret, header, body, time.time(), REPLAY_WINDOW_S
                )
                event = orjson.loads(body) if ok else None
                with sink.lock:
                    if event is None:
                        sink.bad.append(header)
                        status = 401
                    else:
                        sink.attempts.append(event["id"])
                        status = 400 if event["id"] in sink.refuse else sink.status
                        if 200 <= status < 300:
                            sink.events.append(event)
                            sink.signed.append((header, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def config(self, name: str = "test", **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "url": self.url,
            "secret": self.secret.decode(),
            "timeout_s": 2,
            "backoff_s": 0.02,
            "max_backoff_s": 0.2,
            **extra,
        }

    def taken(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def __enter__(self) -> EventSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
