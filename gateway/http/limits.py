"""Per-principal rate limits and quotas on inference (router.policy.limits has the document
and the token bucket), and the per-client accounting that comes with them.

``Limits.gate`` is None while no limits document is in force: the request path then pays one
attribute read. With a document, each request is checked once, all or nothing, by the state
store's ``take_limits``: in this process's memory without Redis; with Redis one atomic script,
so the limits hold for the whole fleet (a deliberate exception to "the request path never
waits on Redis", docs/architecture.md). A request-rate check runs before the body is read; a
rule that counts rows is checked once the shape is known, before the model runs.

When Redis fails, each replica enforces its share of every limit (the limit divided by the
live replicas it last saw, gateway.background.fleet) from its own buckets, says so in
``turnout_rate_limit_fallback``, and tries Redis again after ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway.background.fleet import TRAFFIC
from gateway.background.tasks import stop_task
from gateway.errors import BadRequest, RateLimited
from gateway.http.clients import Clients
from gateway.serving.registry import Loaded
from gateway.settings import SettingsError
from router.policy.limits import DAY_S, LimitsDoc, LocalLimiter, Refusal, Rule, parse_limits
from router.policy.policies import PolicyError
from router.state.store import StateStore, StoreUnavailable

log = logging.getLogger("turnout.limits")

RETRY_S = 1.0  # after a Redis failure, the local share is used this long before trying again
MAX_RULE_CACHE = 10_000  # resolved (principal, model) rules kept


@dataclass(slots=True)
class Ticket:
    """One request's principal, metric label, model and the rule that applies (None: none)."""

    gate: Gate
    principal: str
    label: str
    model: str
    rule: Rule | None

    async def before_body(self) -> None:
        """A rule on requests alone is checked before anything of the request is read."""
        if self.rule is not None and not self.rule.limits_rows:
            await self.gate.admit(self, 0)

    async def before_run(self, inputs: dict[str, np.ndarray], loaded: Loaded) -> None:
        """A rule on rows is checked once the inputs' shapes are known; then the inputs are
        compared with the version's reference range (the extraction signal)."""
        if self.rule is not None and self.rule.limits_rows:
            first = next(iter(inputs.values()), None)
            rows = first.shape[0] if first is not None and first.ndim else 1
            await self.gate.admit(self, rows)
        if loaded.drift_input is not None:
            self.gate.clients.inspect(
                self.label, inputs.get(loaded.drift_input), loaded.monitor.bounds
            )


class Gate:
    """The limits of one document, as the request path asks them."""

    def __init__(self, doc: LimitsDoc, owner: Limits) -> None:
        self.doc = doc
        self.owner = owner
        self.clients = owner.clients
        self._rules: dict[tuple[str, str], Rule | None] = {}

    def ticket(self, principal: str, model: str) -> Ticket:
        """Count the request for its client and find its rule."""
        label = self.clients.label(principal)
        self.clients.by_label[label].requests += 1
        key = (principal, model)
        try:
            rule = self._rules[key]
        except KeyError:
            rule = self.doc.rule(principal, model)
            if len(self._rules) >= MAX_RULE_CACHE:
                self._rules.clear()
            self._rules[key] = rule
        return Ticket(self, principal, label, model, rule)

    async def admit(self, ticket: Ticket, rows: int) -> None:
        """Take the request from its buckets, or raise RateLimited (nothing taken)."""
        rule = ticket.rule
        assert rule is not None
        if rule.rows_per_s is not None and rows > rule.row_burst:
            raise BadRequest(
                f"{rows} rows in one request, above this client's rows_burst of "
                f"{rule.row_burst} on {ticket.model!r}: it could never pass; send fewer rows"
            )
        refusal = await self.owner.take(ticket.principal, ticket.model, rule, rows)
        if refusal is not None:
            raise refused(rule, refusal)


def refused(rule: Rule, refusal: Refusal) -> RateLimited:
    """The 429 of ``refusal``, with Retry-After and the draft-ietf-httpapi-ratelimit-headers
    fields: ``RateLimit-Policy`` lists the rule's limits (a token bucket as its burst ``q`` per
    ``w`` seconds to refill it), ``RateLimit`` the one exceeded."""
    wait = max(1, math.ceil(refusal.wait_s))
    headers = {
        "RateLimit-Policy": ", ".join(policies(rule)),
        "RateLimit": f'"{refusal.which}";r={max(0, refusal.remaining)};t={wait}',
    }
    what = {"requests": "request rate", "rows": "row rate", "day": "daily row quota"}
    return RateLimited(
        f"over this client's {what[refusal.which]} limit; retry in {wait} s", wait, headers
    )


def policies(rule: Rule) -> list[str]:
    out = []
    if rule.requests_per_s is not None:
        burst = rule.request_burst
        out.append(f'"requests";q={burst};w={max(1, math.ceil(burst / rule.requests_per_s))}')
    if rule.rows_per_s is not None:
        burst = rule.row_burst
        w = max(1, math.ceil(burst / rule.rows_per_s))
        out.append(f'"rows";q={burst};w={w};qu="rows"')
    if rule.rows_per_day is not None:
        out.append(f'"day";q={rule.rows_per_day};w={DAY_S};qu="rows"')
    return out


def read_limits(path: Path) -> LimitsDoc:
    """The limits document in ``path``; SettingsError naming the variable and the field."""
    name = "TURNOUT_LIMITS"
    try:
        raw = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {str(path)!r}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise SettingsError(f"{name}: {str(path)!r} is not JSON: {exc}") from None
    try:
        return parse_limits(raw)
    except PolicyError as exc:
        raise SettingsError(f"{name}: {str(path)!r}: {exc}") from None


class Limits:
    """The limits in force (``gate``), their changes, the fallback and the client figures."""

    def __init__(
        self,
        store: StateStore,
        keys: Collection[str],
        doc: LimitsDoc | None,
        *,
        shared: bool,
        period_s: float,
    ) -> None:
        self.store = store
        self.shared = shared
        self.period_s = period_s
        self.clients = Clients(keys)
        self.gate: Gate | None = None
        self.doc_json: dict[str, Any] | None = None
        self.replicas = 1  # live replicas last seen (the fallback's divisor)
        self.fallback = False
        self._retry_at = 0.0
        self._local = LocalLimiter()
        self._task: asyncio.Task[None] | None = None
        if doc is not None:
            self.install(doc)

    def install(self, doc: LimitsDoc) -> None:
        self.gate = Gate(doc, self)
        self.doc_json = doc.as_json()

    async def put(self, raw: Any, who: str, reason: str) -> dict[str, Any]:
        """Validate ``raw`` fully (PolicyError naming the field), store it with its audit entry,
        and put it in force here; the other replicas take it within a period."""
        doc = parse_limits(raw)
        await self.store.put_limits(doc.as_json(), who=who, reason=reason)
        self.install(doc)
        assert self.doc_json is not None
        return self.doc_json

    async def take(self, principal: str, model: str, rule: Rule, rows: int) -> Refusal | None:
        now = time.monotonic()
        if now >= self._retry_at:
            try:
                refusal = await self.store.take_limits(principal, model, rule, rows)
            except StoreUnavailable as exc:
                if not self.fallback:
                    log.warning(
                        "rate limits: store unavailable (%s); enforcing this replica's share "
                        "(1/%d) until it answers",
                        exc,
                        self.replicas,
                    )
                self.fallback, self._retry_at = True, now + RETRY_S
            else:
                if self.fallback:
                    log.warning("rate limits: store answers again; fleet-wide limits restored")
                self.fallback = False
                return refusal
        return self._local.take(principal, model, rule.share(self.replicas), rows, time.time())

    # -- background -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await stop_task(self._task)  # repeats the cancellation a Redis command may swallow

    async def refresh(self) -> None:
        """Take the document another replica put; count the live replicas."""
        if not self.shared:
            return
        try:
            raw = await self.store.limits()
            if self.gate is not None:
                # one field of each member (the traffic it publishes, a few kB), not its
                # whole publish (its monitors' and quality's counters: up to MiBs)
                live = await self.store.read_counts("", fields=(TRAFFIC,))
                self.replicas = max(1, len(live))
        except StoreUnavailable as exc:
            log.debug("rate limits not refreshed: %s", exc)
            return
        if raw is not None and raw != self.doc_json:
            try:
                self.install(parse_limits(raw))
            except ValueError as exc:  # written by a newer or older gateway
                log.warning("stored rate limits not applied: %s", exc)

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            self.clients.tick(time.monotonic())
            await asyncio.sleep(self.period_s)
