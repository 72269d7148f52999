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

from gateway.background.events import SinkConfigError, read_sinks
from gateway.http.limits import read_limits
from gateway.settings import Settings, SettingsError, parse_admin_tokens, parse_credentials
from gateway.worker import HeadLimitedHttpTools, log_config

_CREDENTIAL_FLAGS = {
    "admin_token": "TURNOUT_ADMIN_TOKENS",
    "api_key": "TURNOUT_API_KEYS",
    "feedback_key": "TURNOUT_FEEDBACK_KEYS",
}


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
        uvicorn.run(
            "gateway.app:app_from_env", factory=True, workers=settings.workers,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **common,
        )  # fmt: skip
    return 0


# How long uvicorn's supervisor waits for a worker to answer its health ping before it kills the
# worker as hung (uvicorn's default: 5 s). A new worker answers once it has unpickled its config,
# which imports gateway.worker (about 1 s from the process's start on an idle 2-core machine):
# 10 s leaves room for a loaded machine. It is also how long a worker that dies while a ping to
# it is in flight goes unnoticed (the supervisor holds both ends of the pipe: no EOF), so not more.
WORKER_HEALTHCHECK_S = 10


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
