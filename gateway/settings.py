"""The one settings object. ``Settings.from_env`` is the only reader of the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

GraphOptimization = Literal["disable", "basic", "extended", "all"]

ENV_PREFIX = "TURNOUT_"


class SettingsError(ValueError):
    """A setting could not be read; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # token name -> token; the name is what the audit trail records, the token is never logged.
    admin_tokens: Mapping[str, str] = field(default_factory=dict)
    # token name -> when it stops working (``NAME=TOKEN@2026-12-31T00:00:00Z``); read from the
    # same variable as the tokens, as are ``api_key_expiry`` from ``TURNOUT_API_KEYS``.
    admin_token_expiry: Mapping[str, datetime] = field(default_factory=dict)
    # key name -> key for the inference API; none configured means the API is open.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    api_key_expiry: Mapping[str, datetime] = field(default_factory=dict)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"
    execution_threads: int = 2
    max_body_bytes: int = 64 * 1024 * 1024
    max_tensor_elements: int = 1 << 24
    # Rows (first axis of inputs whose first axis is dynamic) in one request.
    max_batch_rows: int = 1 << 16
    # Request line plus headers, enforced while they are read (431 beyond).
    max_header_bytes: int = 64 * 1024
    # Per-principal rate limits and quotas, a JSON file (router.policy.limits; read and
    # validated by gateway.http.limits.read_limits when the CLI starts): none, no limits.
    limits: Path | None = None
    redis_url: str | None = None
    redis_prefix: str = "turnout:"
    # How long an inference id stays joinable with feedback (bandit rewards, A/B outcomes).
    feedback_ttl_s: int = 3600
    # Honour the X-Turnout-Version debug header that forces a version (off in production).
    version_override: bool = False
    # Shadow copies in flight per worker; beyond it copies are dropped (and counted), never queued.
    max_shadow_inflight: int = 64
    # Dynamic batching defaults; a version's config.json overrides them.
    batching: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue: int = 256
    # Requests estimated to run in less than this run on the event loop thread when the version
    # is idle (no thread hop); 0 turns it off.
    inline_threshold_us: int = 100
    # Deadline of a request without a "timeout" parameter, in milliseconds (0: none).
    request_timeout_ms: int = 0
    # A request whose own "timeout" is below this, in milliseconds, and that times out, is not
    # held against the version by the rollout guards (a client could fail a canary on purpose).
    guard_deadline_floor_ms: int = 1000
    # The inline drift and latency monitors; off, no request feeds them and there is no drift
    # endpoint, per-version latency histogram or monitor-based guard.
    monitors: bool = True
    # Where computed reference outputs are kept between starts (none: computed at every load).
    cache_dir: Path | None = None
    # The current window of drift and latency monitors (the cumulative view is since load).
    drift_window_s: int = 300
    log_level: str = "info"
    # Periods of the background loops, in seconds: buffered routing counts pushed to the store;
    # guard evaluation; the guard lease (a dead leader is replaced within it); counters published
    # to the fleet. The defaults suit production; tests shorten them instead of sleeping.
    flush_s: float = 0.2
    guard_tick_s: float = 0.5
    lease_ttl_s: float = 3.0
    publish_s: float = 1.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> Settings:
        """Read ``TURNOUT_*`` variables; ``overrides`` (same names) win, as CLI flags do."""
        env = {**(os.environ if environ is None else environ), **(overrides or {})}
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw == "" or f.name in _EXPIRY_OF.values():
                continue
            if f.name in _EXPIRY_OF:
                values[f.name], values[_EXPIRY_OF[f.name]] = parse_credentials(name, raw)
                continue
            values[f.name] = _cast(name, f.name, raw)
        if "model_repository" not in values:
            raise SettingsError(f"{ENV_PREFIX}MODEL_REPOSITORY is required")
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def to_env(self) -> dict[str, str]:
        """The inverse of from_env: how the CLI hands settings to worker processes."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in _EXPIRY_OF.values():
                continue
            if f.name in _EXPIRY_OF:
                expiry = getattr(self, _EXPIRY_OF[f.name])
                value = ",".join(
                    f"{k}={v}" + (f"@{expiry[k].isoformat()}" if k in expiry else "")
                    for k, v in value.items()
                )
            out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    def check(self) -> None:
        for name in ("port", "workers", "intra_op_threads", "execution_threads"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be positive")
        if self.inter_op_threads < 1:
            raise SettingsError(f"{ENV_PREFIX}INTER_OP_THREADS must be positive")
        if self.max_body_bytes < 1024:
            raise SettingsError(f"{ENV_PREFIX}MAX_BODY_BYTES must be at least 1024")
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_queue_delay_us < 0:
            raise SettingsError(
                f"{ENV_PREFIX}MAX_BATCH_SIZE and {ENV_PREFIX}MAX_QUEUE must be positive, "
                f"{ENV_PREFIX}MAX_QUEUE_DELAY_US not negative"
            )
        if self.request_timeout_ms < 0 or self.guard_deadline_floor_ms < 0:
            raise SettingsError(
                f"{ENV_PREFIX}REQUEST_TIMEOUT_MS and {ENV_PREFIX}GUARD_DEADLINE_FLOOR_MS must not "
                "be negative"
            )
        if self.drift_window_s < 10:
            raise SettingsError(f"{ENV_PREFIX}DRIFT_WINDOW_S must be at least 10")
        if self.feedback_ttl_s < 1 or self.max_shadow_inflight < 0:
            raise SettingsError(
                f"{ENV_PREFIX}FEEDBACK_TTL_S and {ENV_PREFIX}MAX_SHADOW_INFLIGHT must be positive"
            )
        if self.workers > 1 and not self.redis_url:
            raise SettingsError(
                f"{ENV_PREFIX}WORKERS={self.workers} needs {ENV_PREFIX}REDIS_URL: without a shared "
                "store each worker would keep its own routing state (split-brain)"
            )
        if self.max_tensor_elements < 1 or self.max_batch_rows < 1:
            raise SettingsError(
                f"{ENV_PREFIX}MAX_TENSOR_ELEMENTS and {ENV_PREFIX}MAX_BATCH_ROWS must be positive"
            )
        if self.max_header_bytes < 1024:
            raise SettingsError(f"{ENV_PREFIX}MAX_HEADER_BYTES must be at least 1024")
        for name in ("flush_s", "guard_tick_s", "lease_ttl_s", "publish_s"):
            if not 0.0 < getattr(self, name) <= 3600.0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be in (0, 3600] seconds")
        if self.lease_ttl_s <= self.guard_tick_s:
            raise SettingsError(
                f"{ENV_PREFIX}LEASE_TTL_S must exceed {ENV_PREFIX}GUARD_TICK_S, or the guard "
                "lease lapses between two ticks of its holder"
            )
        if self.graph_optimization not in get_args(GraphOptimization):
            choices = ", ".join(get_args(GraphOptimization))
            raise SettingsError(f"{ENV_PREFIX}GRAPH_OPTIMIZATION must be one of {choices}")


# Credential settings and the field holding their expiry times.
_EXPIRY_OF: Mapping[str, str] = {
    "admin_tokens": "admin_token_expiry",
    "api_keys": "api_key_expiry",
}


def parse_credentials(name: str, raw: str) -> tuple[dict[str, str], dict[str, datetime]]:
    """``name=secret[@expiry],...`` -> ({name: secret}, {name: expiry}); secrets never appear in
    messages. An expiry is an ISO 8601 time with a zone (``2026-12-31T00:00:00Z``)."""
    secrets: dict[str, str] = {}
    expiry: dict[str, datetime] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        who, sep, secret = item.partition("=")
        who, secret = who.strip(), secret.strip()
        if not sep or not who or not secret:
            raise SettingsError(f"{name}: each entry must be NAME=TOKEN (got an entry for {who!r})")
        head, at, until = secret.rpartition("@")
        if at:
            secret, expiry[who] = head, _expiry(name, who, until)
        if len(secret) < 8:
            raise SettingsError(f"{name}: the token for {who!r} is shorter than 8 characters")
        if who in secrets:
            raise SettingsError(f"{name}: token name {who!r} given twice")
        secrets[who] = secret
    return secrets, expiry


def parse_tokens(name: str, raw: str) -> dict[str, str]:
    """``name=token,name2=token2@expiry`` -> {name: token}, without the expiry times."""
    return parse_credentials(name, raw)[0]


def _expiry(name: str, who: str, text: str) -> datetime:
    # The text is never shown: with a stray '@' it may be part of the secret.
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SettingsError(
            f"{name}: the expiry of {who!r} must be an ISO 8601 time such as "
            "2026-12-31T00:00:00Z (a token cannot contain '@')"
        ) from None
    if when.utcoffset() is None:
        raise SettingsError(f"{name}: the expiry of {who!r} needs a time zone, e.g. Z for UTC")
    return when.astimezone(UTC)


def _cast(env_name: str, field_name: str, raw: str) -> object:
    if field_name in ("model_repository", "cache_dir", "limits"):
        return Path(raw)
    if field_name in ("host", "redis_url", "redis_prefix", "log_level", "graph_optimization"):
        return raw
    if field_name in ("version_override", "batching", "monitors"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{env_name} must be true or false, got {raw!r}")
    if field_name in ("flush_s", "guard_tick_s", "lease_ttl_s", "publish_s"):
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{env_name} must be a number, got {raw!r}") from None
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{env_name} must be an integer, got {raw!r}") from None
