"""The one settings object. ``Settings.from_env`` is the only reader of the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

GraphOptimization = Literal["disable", "basic", "extended", "all"]
# Admin token roles, in order: each role may do what the roles before it may (gateway.http.access).
Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)

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
    # token name -> its role and model scope (``NAME:ROLE[:MODEL+MODEL]=TOKEN``), read from the
    # same variable; a token without an entry is an unscoped ``admin``.
    admin_token_grants: Mapping[str, Grant] = field(default_factory=dict)
    # key name -> key for the inference API; none configured means the API is open.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    api_key_expiry: Mapping[str, datetime] = field(default_factory=dict)
    # key name -> key for feedback; when any is configured, feedback needs one of these (an API
    # key is not enough); none means feedback takes an API key, as inference does.
    feedback_keys: Mapping[str, str] = field(default_factory=dict)
    feedback_key_expiry: Mapping[str, datetime] = field(default_factory=dict)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"
    execution_threads: int = 2
    # Sized for the reference pod (2 GiB): docs/deploy.md has the arithmetic.
    max_body_bytes: int = 16 * 1024 * 1024
    # Bytes one request's tensors may take decoded (strings: UTF-8 bytes plus 64 each), checked
    # before they are allocated (413 beyond).
    max_decoded_bytes: int = 128 * 1024 * 1024
    max_tensor_elements: int = 1 << 24
    # Rows (first axis of inputs whose first axis is dynamic) in one request.
    max_batch_rows: int = 1 << 16
    # The outputs of one request as tensors (elements × size, strings by their bytes), checked
    # before they are encoded (413 beyond). A JSON response takes up to ~4× this (a float32 as
    # text): about 64 MiB at the default.
    max_response_bytes: int = 16 * 1024 * 1024
    # Request line plus headers, enforced while they are read (431 beyond).
    max_header_bytes: int = 64 * 1024
    # Seconds a connection may take to send a whole request head; a body may go without sending
    # a byte; an idle keep-alive connection waits for its next request. The server closes it then
    # (a late head or a stalled body is answered 408 first).
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    # Per-principal rate limits and quotas, a JSON file (router.policy.limits; read and
    # validated by gateway.http.limits.read_limits when the CLI starts): none, no limits.
    limits: Path | None = None
    redis_url: str | None = None
    redis_prefix: str = "turnout:"
    # How long an inference id stays joinable with feedback (bandit rewards, A/B outcomes).
    feedback_ttl_s: int = 3600
    # Bounds of the in-process feedback join (ids kept for the window); the oldest go first.
    feedback_max_entries: int = 1_000_000
    feedback_max_bytes: int = 128 << 20
    # How long a served prediction stays joinable with its outcome (label), in seconds; with
    # Redis the fleet's join keeps it there, else the in-process join within these bounds.
    outcome_ttl_s: int = 7 * 86_400
    outcome_max_entries: int = 1_000_000
    outcome_max_bytes: int = 256 << 20
    # The window of the quality figures (labels by arrival, served scores by serving time) that
    # the quality endpoint, metrics and quality guards report (the cumulative view: since load).
    quality_window_s: int = 86_400
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
    # Deadline of a request without a "timeout" parameter, in milliseconds (0: none). Under the
    # pod's 45 s termination grace and common load balancers' 60 s idle timeouts.
    request_timeout_ms: int = 30_000
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
    # The prediction log (docs/prediction-log.md): model -> share of its answered requests
    # recorded ("*": every other model); nothing is recorded by default. Records go to a
    # directory of gzip JSON-lines files, or as CloudEvents to a URL (one of the two).
    prediction_log_sample: Mapping[str, float] = field(default_factory=dict)
    prediction_log_dir: Path | None = None
    prediction_log_url: str | None = None
    # Signs the URL's batches as the event stream signs its events (Turnout-Signature);
    # read from the environment only, never shown.
    prediction_log_secret: str | None = field(default=None, repr=False)
    # A file is closed at this compressed size or age; the directory is kept under
    # retain_bytes by deleting the oldest closed files.
    prediction_log_rotate_bytes: int = 64 << 20
    prediction_log_rotate_s: int = 3600
    prediction_log_retain_bytes: int = 1 << 30
    # Records waiting for the writer, by count and by the bytes their arrays hold; beyond
    # either, records are dropped (turnout_predictions_dropped_total{reason="queue_full"}).
    prediction_log_queue: int = 10_000
    prediction_log_queue_bytes: int = 64 << 20
    # Periods of the background loops, in seconds: buffered routing counts pushed to the store;
    # guard evaluation; the guard lease (a dead leader is replaced within it); counters published
    # to the fleet. The defaults suit production; tests shorten them instead of sleeping.
    flush_s: float = 0.2
    guard_tick_s: float = 0.5
    lease_ttl_s: float = 3.0
    publish_s: float = 1.0
    # The event stream (docs/events.md): the CloudEvents ``source`` (none: turnout/<host>); the
    # sinks file (JSON, read and validated when the CLI starts; none: events are only listed by
    # GET /admin/events); the directory of the outbox when there is no Redis (none: the
    # process's memory, lost on restart); the outbox's bounds; the delivery and drift-watch tick.
    event_source: str | None = None
    event_sinks: Path | None = None
    events_dir: Path | None = None
    events_max: int = 100_000
    events_max_bytes: int = 64 << 20
    events_tick_s: float = 1.0
    # Seconds between the drift watcher's looks at every version's drift status (drift.changed).
    drift_events_s: float = 10.0

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
            if raw is None or raw == "" or f.name in _DERIVED:
                continue
            if f.name == "admin_tokens":
                tokens, expiry, grants = parse_admin_tokens(name, raw)
                values.update(admin_tokens=tokens, admin_token_expiry=expiry)
                values["admin_token_grants"] = grants
                continue
            if f.name in _EXPIRY_OF:
                values[f.name], values[_EXPIRY_OF[f.name]] = parse_credentials(name, raw)
                continue
            if f.name == "prediction_log_sample":
                values[f.name] = parse_rates(name, raw)
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
            if value is None or f.name in _DERIVED:
                continue
            if f.name in _EXPIRY_OF:
                expiry = getattr(self, _EXPIRY_OF[f.name])
                grants = self.admin_token_grants if f.name == "admin_tokens" else {}
                value = ",".join(
                    (grants[k].label(k) if k in grants else k)
                    + f"={v}"
                    + (f"@{expiry[k].isoformat()}" if k in expiry else "")
                    for k, v in value.items()
                )
            elif f.name == "prediction_log_sample":
                value = ",".join(f"{k}={v!r}" for k, v in value.items())
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
        if self.feedback_max_entries < 1 or self.feedback_max_bytes < 1 << 20:
            raise SettingsError(
                f"{ENV_PREFIX}FEEDBACK_MAX_ENTRIES must be positive and "
                f"{ENV_PREFIX}FEEDBACK_MAX_BYTES at least 1048576 (1 MiB)"
            )
        if self.outcome_ttl_s < 1 or self.quality_window_s < 60:
            raise SettingsError(
                f"{ENV_PREFIX}OUTCOME_TTL_S must be positive, {ENV_PREFIX}QUALITY_WINDOW_S at "
                "least 60"
            )
        if self.outcome_max_entries < 1 or self.outcome_max_bytes < 1 << 20:
            raise SettingsError(
                f"{ENV_PREFIX}OUTCOME_MAX_ENTRIES must be positive and "
                f"{ENV_PREFIX}OUTCOME_MAX_BYTES at least 1048576 (1 MiB)"
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
        if self.max_response_bytes < 1024:
            raise SettingsError(f"{ENV_PREFIX}MAX_RESPONSE_BYTES must be at least 1024")
        if self.max_header_bytes < 1024:
            raise SettingsError(f"{ENV_PREFIX}MAX_HEADER_BYTES must be at least 1024")
        if self.max_decoded_bytes < 1024:
            raise SettingsError(f"{ENV_PREFIX}MAX_DECODED_BYTES must be at least 1024")
        for name in _SECONDS:
            if not 0.0 < getattr(self, name) <= 3600.0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be in (0, 3600] seconds")
        if self.lease_ttl_s <= self.guard_tick_s:
            raise SettingsError(
                f"{ENV_PREFIX}LEASE_TTL_S must exceed {ENV_PREFIX}GUARD_TICK_S, or the guard "
                "lease lapses between two ticks of its holder"
            )
        if self.events_max < 100 or self.events_max_bytes < 1 << 20:
            raise SettingsError(
                f"{ENV_PREFIX}EVENTS_MAX must be at least 100 and {ENV_PREFIX}EVENTS_MAX_BYTES at "
                "least 1048576 (1 MiB)"
            )
        if self.event_source is not None and not 0 < len(self.event_source) <= 256:
            raise SettingsError(f"{ENV_PREFIX}EVENT_SOURCE must be 1 to 256 characters")
        self._check_prediction_log()
        if self.graph_optimization not in get_args(GraphOptimization):
            choices = ", ".join(get_args(GraphOptimization))
            raise SettingsError(f"{ENV_PREFIX}GRAPH_OPTIMIZATION must be one of {choices}")

    def _check_prediction_log(self) -> None:
        sinks = [s for s in (self.prediction_log_dir, self.prediction_log_url) if s]
        if len(sinks) > 1:
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_DIR and {ENV_PREFIX}PREDICTION_LOG_URL: one sink only"
            )
        if not sinks and any(rate > 0 for rate in self.prediction_log_sample.values()):
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_SAMPLE needs {ENV_PREFIX}PREDICTION_LOG_DIR or "
                f"{ENV_PREFIX}PREDICTION_LOG_URL: where the records go"
            )
        url = self.prediction_log_url
        if url and not url.startswith(("http://", "https://")):
            raise SettingsError(f"{ENV_PREFIX}PREDICTION_LOG_URL must be an http(s) URL")
        secret = self.prediction_log_secret
        if secret is not None and (not url or len(secret) < 16):  # as an event sink's secret
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_SECRET signs the batches sent to "
                f"{ENV_PREFIX}PREDICTION_LOG_URL (which it needs): at least 16 characters"
            )
        if self.prediction_log_rotate_bytes < 1024 or self.prediction_log_rotate_s < 1:
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_ROTATE_BYTES must be at least 1024 and "
                f"{ENV_PREFIX}PREDICTION_LOG_ROTATE_S at least 1"
            )
        if self.prediction_log_retain_bytes < self.prediction_log_rotate_bytes:
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_RETAIN_BYTES must be at least "
                f"{ENV_PREFIX}PREDICTION_LOG_ROTATE_BYTES (a file of its own size)"
            )
        if self.prediction_log_queue < 1 or self.prediction_log_queue_bytes < 1 << 20:
            raise SettingsError(
                f"{ENV_PREFIX}PREDICTION_LOG_QUEUE must be positive and "
                f"{ENV_PREFIX}PREDICTION_LOG_QUEUE_BYTES at least 1048576 (1 MiB)"
            )


@dataclass(frozen=True, slots=True)
class Grant:
    """What an admin token may do: its role, and the models it may act on (None: every model)."""

    role: Role = "admin"
    models: frozenset[str] | None = None

    def label(self, name: str) -> str:
        """``NAME:ROLE[:MODEL+MODEL]``, as written in ``TURNOUT_ADMIN_TOKENS``."""
        scope = "" if self.models is None else ":" + "+".join(sorted(self.models))
        return f"{name}:{self.role}{scope}"


# Settings in seconds, as floats.
_SECONDS = (
    "flush_s",
    "guard_tick_s",
    "lease_ttl_s",
    "publish_s",
    "events_tick_s",
    "drift_events_s",
    "head_timeout_s",
    "body_timeout_s",
    "keep_alive_timeout_s",
)

# Credential settings and the field holding their expiry times.
_EXPIRY_OF: Mapping[str, str] = {
    "admin_tokens": "admin_token_expiry",
    "api_keys": "api_key_expiry",
    "feedback_keys": "feedback_key_expiry",
}
# Fields read from another field's variable.
_DERIVED = {*_EXPIRY_OF.values(), "admin_token_grants"}


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


def parse_admin_tokens(
    name: str, raw: str
) -> tuple[dict[str, str], dict[str, datetime], dict[str, Grant]]:
    """``NAME[:ROLE[:MODEL+MODEL]]=TOKEN[@EXPIRY],...`` -> tokens, expiry times and grants, each
    keyed by the bare NAME (what the audit trail records). ``NAME=TOKEN`` is an unscoped admin."""
    labelled, labelled_expiry = parse_credentials(name, raw)
    tokens: dict[str, str] = {}
    expiry: dict[str, datetime] = {}
    grants: dict[str, Grant] = {}
    for label, secret in labelled.items():
        who, grant = _grant(name, label)
        if who in tokens:
            raise SettingsError(f"{name}: token name {who!r} given twice")
        tokens[who] = secret
        if label in labelled_expiry:
            expiry[who] = labelled_expiry[label]
        if grant is not None:
            grants[who] = grant
    return tokens, expiry, grants


def _grant(name: str, label: str) -> tuple[str, Grant | None]:
    """``NAME[:ROLE[:MODEL+MODEL]]`` -> (NAME, its grant, None for a bare name)."""
    who, colon, rest = label.partition(":")
    if not colon:
        return who, None
    role, scoped, scope = rest.partition(":")
    if not who:
        raise SettingsError(f"{name}: an entry {label!r} has no token name before ':'")
    if role not in ROLES:
        raise SettingsError(
            f"{name}: the role of {who!r} must be one of {', '.join(ROLES)} (got {role!r})"
        )
    if not scoped:
        return who, Grant(role)
    models = scope.split("+")
    if not all(m and m == m.strip() and ":" not in m for m in models):
        raise SettingsError(
            f"{name}: the models of {who!r} must be names joined by '+', such as fraud+risk "
            f"(got {scope!r})"
        )
    return who, Grant(role, frozenset(models))


def parse_rates(name: str, raw: str) -> dict[str, float]:
    """``fraud=0.1,*=0`` -> {model: rate}, each rate in [0, 1]; ``*`` is every other model."""
    rates: dict[str, float] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, text = (part.strip() for part in item.partition("="))
        try:
            rate = float(text)
        except ValueError:
            rate = -1.0
        if not sep or not model or not 0.0 <= rate <= 1.0:
            raise SettingsError(
                f"{name}: each entry must be MODEL=RATE with RATE in [0, 1], such as "
                f"fraud=0.1,*=0 (got {item[:80]!r})"
            )
        if model in rates:
            raise SettingsError(f"{name}: model {model[:80]!r} given twice")
        rates[model] = rate
    return rates


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
    if field_name in (
        "model_repository", "cache_dir", "limits", "prediction_log_dir", "event_sinks",
        "events_dir",
    ):  # fmt: skip
        return Path(raw)
    if field_name in (
        "host", "redis_url", "redis_prefix", "log_level", "graph_optimization",
        "prediction_log_url", "prediction_log_secret", "event_source",
    ):  # fmt: skip
        return raw
    if field_name in ("version_override", "batching", "monitors"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{env_name} must be true or false, got {raw!r}")
    if field_name in _SECONDS:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{env_name} must be a number, got {raw!r}") from None
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{env_name} must be an integer, got {raw!r}") from None
