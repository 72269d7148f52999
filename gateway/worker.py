"""What uvicorn hands each worker process: the HTTP protocol (``HeadLimitedHttpTools``) and
the log formatter. A worker unpickles these before it answers its supervisor's health pings,
so this module imports uvicorn and nothing heavy (the app itself is imported after, while the
worker answers): with them in ``gateway.cli`` a new worker first imported the whole gateway,
5 s for two workers on 2 cores, and uvicorn killed it as hung (docs/development.md).
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.serving.backlog import STATE_KEY

_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Control characters (C0, DEL, C1 including the one-byte CSI) and Unicode line separators, as
# escapes: a client-supplied value in a message can neither start a forged log line nor drive a
# terminal.
_ESCAPES = {
    **{c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters are escaped in the message and in a traceback
    too (an exception's message may quote client input), so log shippers see whole records."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_ESCAPES)


def log_config(level: str) -> dict[str, Any]:
    """One handler on the root logger for the gateway's and uvicorn's records (uvicorn applies
    it again in each worker process)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"safe": {"()": SafeFormatter, "fmt": _LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "safe",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn answers 400, which
    ``send_400_response`` turns into the 431."""


# What a connection is doing, for its timeouts: waiting for a request's head (since it opened or
# since its previous response), receiving a body, or neither (the app has the request, or
# uvicorn's keep-alive timer has the idle connection).
_HEAD, _BODY, _OTHER = 0, 1, 2


class HeadLimitedHttpTools(HttpToolsProtocol):
    """httptools with a cap on the request head (request line and headers) and timeouts on what
    the client sends. llhttp has no cap, so one client could make a worker buffer gigabytes of
    headers. The cap is uvicorn's ``h11_max_incomplete_event_size`` (which h11 honours and
    httptools ignores).

    A head still incomplete after a read is measured in raw bytes, so one header that never
    ends is refused within one read; a complete head is measured once, from the request line
    and headers uvicorn parsed. (Measuring in the per-header callbacks instead cost 9 % of a
    light model's throughput: two Python calls per header.)

    uvicorn times out only idle keep-alive connections. Here a connection must also send a whole
    head within ``head_timeout_s`` of opening (or of its first byte after a response), and a body
    must not go ``body_timeout_s`` without a byte; either is answered 408 and closed, which frees
    the body received so far (the app's read sees a disconnect). The callbacks only note the time;
    one sweep per server, every quarter of the shorter timeout (at most 1 s), closes the late
    connections: a timer per request cost more than the cap on the light model.
    """

    def __init__(
        self,
        *args: Any,
        head_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._raw = 0  # bytes received while the current head is incomplete
        self._in_head = True
        self._refusing = False
        self.head_timeout_s, self.body_timeout_s = head_timeout_s, body_timeout_s
        self._phase = _HEAD
        self._since = 0.0  # loop time the phase began, or of the body's last byte

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._since = self.loop.time()
        state = self.server_state
        if not getattr(state, "turnout_sweeping", False):
            state.turnout_sweeping = True  # type: ignore[attr-defined]
            self.loop.call_later(self._sweep_period(), self._sweep)

    def _sweep_period(self) -> float:
        return min(1.0, self.head_timeout_s / 4, self.body_timeout_s / 4)

    def _sweep(self) -> None:
        """Close the server's connections whose head or body is late; runs while any is open."""
        now = self.loop.time()
        for conn in list(self.connections):
            if isinstance(conn, HeadLimitedHttpTools) and not conn.transport.is_closing():
                conn._expire(now)
        state = self.server_state
        if self.connections:
            self.loop.call_later(self._sweep_period(), self._sweep)
        else:
            state.turnout_sweeping = False  # type: ignore[attr-defined]

    def _expire(self, now: float) -> None:
        if self._phase == _HEAD and now - self._since > self.head_timeout_s:
            if self._raw:
                self._timed_out(f"the request head did not arrive within {self.head_timeout_s} s")
            else:
                self.transport.close()  # nothing sent: nothing to answer
        elif self._phase == _BODY and now - self._since > self.body_timeout_s:
            self._timed_out(f"the request body sent nothing for {self.body_timeout_s} s")

    def _timed_out(self, message: str) -> None:
        client = self.client[0] if self.client else "-"
        self.logger.info("closed a connection from %s: %s", client, message)
        self._close_with(b"408 Request Timeout", message)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != _HEAD:  # the first byte after a response
            self._phase, self._since = _HEAD, self.loop.time()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._since = self.loop.time()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._phase = _OTHER  # idle: uvicorn's keep-alive timer

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw += len(data)
        super().data_received(data)
        limit = self.config.h11_max_incomplete_event_size
        over = self._in_head and limit is not None and self._raw > limit
        if over and limit is not None and not self.transport.is_closing():
            self._refuse(limit)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._phase, self._since = _BODY, self.loop.time()
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None:
            headers = self.headers
            size = len(self.url) + 4 * len(headers) + sum(len(n) + len(v) for n, v in headers)
            if size > limit:
                self._refusing = True
                raise _HeadTooLarge  # httptools stops; uvicorn calls send_400_response
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._raw = True, 0
        self._phase = _OTHER

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # Count the request for the app's Backlog (gateway.serving.backlog). Should a uvicorn
        # release rename this method, nothing counts and the gateway runs requests as if never busy.
        backlog = self.app_state.get(STATE_KEY)
        if backlog is not None:
            backlog.started += 1
        super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        if self._refusing and limit is not None:
            self._refuse(limit)
        else:
            super().send_400_response(msg)

    def _refuse(self, limit: int) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined response is still being written: just hang up
            return
        client = self.client[0] if self.client else "-"
        self.logger.info("refused a request head over %d bytes from %s", limit, client)
        message = f"request line and headers exceed the limit of {limit} bytes"
        self._close_with(b"431 Request Header Fields Too Large", message)

    def _close_with(self, status: bytes, message: str) -> None:
        """Answer ``{"error": message}`` outside any request cycle, and hang up."""
        from gateway.http.codec import encode_error  # imported by the app by now

        body = encode_error(message)
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body)
        )
        self.transport.close()
