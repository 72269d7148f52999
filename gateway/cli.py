"""``turnout serve`` and ``turnout demo-repo``."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.background.events import SinkConfigError, read_sinks
from gateway.http.codec import encode_error
from gateway.http.limits import read_limits
from gateway.serving.backlog import STATE_KEY
from gateway.settings import Settings, SettingsError, parse_admin_tokens, parse_credentials

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
_CREDENTIAL_FLAGS = {
    "admin_token": "TURNOUT_ADMIN_TOKENS",
    "api_key": "TURNOUT_API_KEYS",
    "feedback_key": "TURNOUT_FEEDBACK_KEYS",
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
        body = encode_error(message)
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body)
        )
        self.transport.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnout", description="ONNX model-serving gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve a model repository (flags override TURNOUT_* variables)"
    )
    serve.add_argument("--model-repository", metavar="DIR")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument(
        "--admin-token",
        action="append",
        metavar="NAME[:ROLE[:MODEL+MODEL]]=TOKEN[@EXPIRY]",
        default=[],
        help="admin bearer token (repeatable); ROLE viewer, operator or admin (the default), "
        "optionally for the models named; EXPIRY is ISO 8601 with a zone",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        metavar="NAME=KEY[@EXPIRY]",
        default=[],
        help="require a key for inference, model metadata, drift and feedback (repeatable)",
    )
    serve.add_argument(
        "--feedback-key",
        action="append",
        metavar="NAME=KEY[@EXPIRY]",
        default=[],
        help="require one of these keys, not an API key, for feedback (repeatable)",
    )
    serve.add_argument(
        "--limits",
        metavar="FILE",
        help="per-client rate limits and quotas (JSON; docs/configuration.md)",
    )
    serve.add_argument(
        "--event-sinks",
        metavar="FILE",
        help="HTTP sinks of the event stream (JSON; docs/events.md)",
    )
    serve.add_argument("--event-source", help="CloudEvents source (default turnout/<host>)")
    serve.add_argument(
        "--events-dir",
        metavar="DIR",
        help="keep the event outbox in this directory when there is no Redis (default: memory)",
    )
    serve.add_argument("--events-max", type=int, help="events the outbox holds (default 100000)")
    serve.add_argument("--events-max-bytes", type=int, help="bytes the outbox holds (64 MiB)")
    serve.add_argument("--events-tick-s", type=float, help="event delivery tick (default 1)")
    serve.add_argument(
        "--drift-events-s", type=float, help="drift.changed: seconds between looks (default 10)"
    )
    serve.add_argument("--redis-url", help="share routing state through Redis")
    serve.add_argument("--redis-prefix", help="key prefix in Redis (default turnout:)")
    serve.add_argument("--feedback-ttl-s", type=int, help="how long an inference id joins feedback")
    serve.add_argument(
        "--feedback-max-entries", type=int, help="inference ids the feedback join keeps (1000000)"
    )
    serve.add_argument(
        "--feedback-max-bytes", type=int, help="memory of the feedback join (134217728, 128 MiB)"
    )
    serve.add_argument(
        "--outcome-ttl-s",
        type=int,
        help="how long a served prediction joins its outcome (604800, 7 days)",
    )
    serve.add_argument(
        "--outcome-max-entries",
        type=int,
        help="predictions the in-process outcome join keeps, without Redis (1000000)",
    )
    serve.add_argument(
        "--outcome-max-bytes",
        type=int,
        help="memory of the in-process outcome join, without Redis (268435456, 256 MiB)",
    )
    serve.add_argument(
        "--quality-window-s", type=int, help="the quality figures' window (default 86400)"
    )
    serve.add_argument(
        "--version-override",
        action="store_const",
        const="true",
        help="honour the X-Turnout-Version debug header (never in production)",
    )
    serve.add_argument("--max-shadow-inflight", type=int)
    serve.add_argument("--drift-window-s", type=int, help="monitors' current window (default 300)")
    serve.add_argument(
        "--cache-dir", help="keep reference outputs here between starts (default: none)"
    )
    serve.add_argument(
        "--no-monitors",
        dest="monitors",
        action="store_const",
        const="false",
        help="no inline drift and latency monitors",
    )
    serve.add_argument(
        "--no-batching",
        dest="batching",
        action="store_const",
        const="false",
        help="never merge requests",
    )
    serve.add_argument("--max-batch-size", type=int, help="rows per merged run (default 64)")
    serve.add_argument("--max-queue-delay-us", type=int, help="wait for a fuller batch (default 0)")
    serve.add_argument("--max-queue", type=int, help="requests waiting per version; beyond: 429")
    serve.add_argument(
        "--request-timeout-ms", type=int, help="default deadline (default 30000; 0: none)"
    )
    serve.add_argument(
        "--guard-deadline-floor-ms",
        type=int,
        help="client deadlines below it do not count against a version (default: 1000)",
    )
    serve.add_argument(
        "--inline-threshold-us",
        type=int,
        help="run cheaper requests on the event loop (default 100)",
    )
    serve.add_argument("--intra-op-threads", type=int)
    serve.add_argument("--inter-op-threads", type=int)
    serve.add_argument("--graph-optimization", choices=["disable", "basic", "extended", "all"])
    serve.add_argument("--execution-threads", type=int)
    serve.add_argument("--max-body-bytes", type=int, help="413 above (default 16 MiB)")
    serve.add_argument(
        "--max-decoded-bytes",
        type=int,
        help="decoded tensor bytes per request (default 128 MiB); 413 above",
    )
    serve.add_argument("--max-tensor-elements", type=int)
    serve.add_argument("--max-batch-rows", type=int, help="rows per request (default 65536)")
    serve.add_argument(
        "--max-response-bytes", type=int, help="outputs of one request (default 16 MiB); 413 above"
    )
    serve.add_argument(
        "--max-header-bytes", type=int, help="request line and headers (default 65536); 431 above"
    )
    serve.add_argument(
        "--head-timeout-s", type=float, help="to send a whole request head (default 10); 408"
    )
    serve.add_argument(
        "--body-timeout-s", type=float, help="a body may send nothing this long (default 30); 408"
    )
    serve.add_argument(
        "--keep-alive-timeout-s", type=float, help="idle connections are closed (default 5)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--prediction-log-sample",
        metavar="MODEL=RATE,...",
        help="record this share of each model's answered requests (*: other models; default "
        "none; docs/prediction-log.md)",
    )
    serve.add_argument("--prediction-log-dir", help="write records as gzip JSON lines here")
    serve.add_argument("--prediction-log-url", help="POST records as CloudEvents batches here")
    serve.add_argument(
        "--prediction-log-rotate-bytes", type=int, help="close a file at this size (64 MiB)"
    )
    serve.add_argument(
        "--prediction-log-rotate-s", type=int, help="close a file at this age (default 3600)"
    )
    serve.add_argument(
        "--prediction-log-retain-bytes",
        type=int,
        help="delete the oldest files beyond this total (default 1 GiB)",
    )
    serve.add_argument(
        "--prediction-log-queue", type=int, help="records waiting to be written (10000)"
    )
    serve.add_argument(
        "--prediction-log-queue-bytes", type=int, help="bytes they may hold (64 MiB)"
    )

    demo = commands.add_parser("demo-repo", help="write the demo model repository")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--no-heavy", action="store_true", help="skip the heavy benchmark model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo-repo":
        from gateway.demo import write_demo_repository

        written = write_demo_repository(args.directory, heavy=not args.no_heavy)
        print(f"wrote {len(written)} model versions under {args.directory}")
        return 0
    return _serve(args)


def serve_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """The settings ``turnout serve ARGV`` runs with: flags over ``TURNOUT_*`` variables of
    ``environ`` (default: the process environment). Raises SettingsError naming the culprit."""
    args = _parser().parse_args(["serve", *argv])
    return _settings(args, environ)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for these settings, logging apart: the one place the HTTP server is
    configured (the test harness runs an in-process server with the same options)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": partial(
            HeadLimitedHttpTools,
            head_timeout_s=settings.head_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        ),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "log_level": settings.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
    }


def _settings(args: argparse.Namespace, environ: Mapping[str, str] | None) -> Settings:
    overrides = {
        f"TURNOUT_{key.upper()}": str(value)
        for key, value in vars(args).items()
        if key not in ("command", *_CREDENTIAL_FLAGS) and value is not None
    }
    for key, variable in _CREDENTIAL_FLAGS.items():
        flags: list[str] = getattr(args, key)
        # Validate each flag on its own so a malformed one is named, then pass them on together.
        parse = parse_admin_tokens if key == "admin_token" else parse_credentials
        for flag in flags:
            parse("--" + key.replace("_", "-"), flag)
        if flags:
            overrides[variable] = ",".join(flags)
    settings = Settings.from_env(environ, overrides=overrides)
    if settings.limits is not None:
        read_limits(settings.limits)  # fail at start, naming the field, not in each worker
    if settings.event_sinks is not None:
        try:
            read_sinks(settings.event_sinks, environ)
        except SinkConfigError as exc:
            raise SettingsError(f"--event-sinks: {exc}") from None
    return settings


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args, None)
    except SettingsError as exc:
        print(f"turnout: {exc}", file=sys.stderr)
        return 2
    logging_config = log_config(settings.log_level)
    logging.config.dictConfig(logging_config)
    _warn_about_credentials(settings)
    common = {**server_options(settings), "log_config": logging_config}
    # uvicorn raises SIGTERM again once it has drained, which would end the process "killed by
    # SIGTERM" (-15); a drained gateway exits 0.
    signal.signal(signal.SIGTERM, _exit_drained)
    if settings.workers == 1:
        from gateway.app import create_app

        uvicorn.run(create_app(settings), **common)
    else:
        # Worker processes rebuild the same settings from the environment.
        os.environ.update(settings.to_env())
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.workers, **common)
    return 0


def _exit_drained(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _warn_about_credentials(settings: Settings) -> None:
    log = logging.getLogger("turnout")
    if not settings.admin_tokens:
        log.warning("no admin tokens configured: the admin and repository APIs refuse every call")
    now = datetime.now(UTC)
    for kind, expiry in [("admin token", settings.admin_token_expiry),
                         ("API key", settings.api_key_expiry),
                         ("feedback key", settings.feedback_key_expiry)]:  # fmt: skip
        for name in sorted(n for n, when in expiry.items() if when <= now):
            log.warning("%s %r expired at %s: it is refused", kind, name, expiry[name].isoformat())
    if settings.api_keys:
        log.info(
            "%d API key(s): inference, model metadata, drift and feedback need one",
            len(settings.api_keys),
        )
    if settings.feedback_keys:
        log.info("%d feedback key(s): feedback needs one", len(settings.feedback_keys))


if __name__ == "__main__":
    sys.exit(main())
