"""A real HTTP sink for CloudEvents in tests, on a free port in a thread: the event stream's
single events (``application/cloudevents+json``) and the prediction log's batches
(``application/cloudevents-batch+json``). With a secret it checks each request's
``Turnout-Signature`` as docs/events.md tells a receiver to (401 when it fails). It keeps every
body it took (``bodies``) and the events in it. ``status`` is what it answers (503: an outage);
``refuse`` holds event ids it answers 400 for (poison); clearing ``release`` makes it hold each
request until it is set again (a sink that blocks; ``arrived`` is set by the first request);
``stop()``/``start()`` take it off the network and back. ``signed`` keeps each taken request's
``(Turnout-Signature header, raw body)``, for a test that checks the signature with a
receiver's code of its own."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

import orjson

from gateway.background.events import CONTENT_TYPE, REPLAY_WINDOW_S, SIGNATURE_HEADER, verify
from gateway.background.prediction_sinks import BATCH_CONTENT_TYPE
from tests.support.server import free_port


class EventSink:
    def __init__(self, secret: str | None, port: int | None = None) -> None:
        self.secret = None if secret is None else secret.encode()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.status = 200
        self.refuse: set[str] = set()
        self.events: list[dict[str, Any]] = []  # taken (2xx answered), in arrival order
        self.bodies: list[tuple[str, bytes]] = []  # (content type, body) of every request
        self.signed: list[tuple[str, bytes]] = []  # taken (2xx answered): (signature, body)
        self.attempts: list[str] = []  # every event id POSTed, whatever the answer
        self.bad: list[str] = []  # requests whose signature or content type failed
        self.release = threading.Event()
        self.release.set()
        self.arrived = threading.Event()
        self.lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> EventSink:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.arrived.set()
                sink.release.wait(30)
                self.send_response(sink.take(self.headers, body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def take(self, headers: Any, body: bytes) -> int:
        """The status for one request, keeping what it carried."""
        content_type = headers.get("Content-Type")
        header = headers.get(SIGNATURE_HEADER, "")
        signed = self.secret is None or verify(
            self.secret, header, body, time.time(), REPLAY_WINDOW_S
        )
        with self.lock:
            self.bodies.append((content_type, body))
            if not signed or content_type not in (CONTENT_TYPE, BATCH_CONTENT_TYPE):
                self.bad.append(header)
                return 401
            doc = orjson.loads(body)
            events = doc if content_type == BATCH_CONTENT_TYPE else [doc]
            ids = [event["id"] for event in events]
            self.attempts += ids
            status = 400 if self.refuse.intersection(ids) else self.status
            if 200 <= status < 300:
                self.events += events
                self.signed.append((header, body))
            return status

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def config(self, name: str = "test", **extra: Any) -> dict[str, Any]:
        assert self.secret is not None
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
