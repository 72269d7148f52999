"""Per-principal rate limits and quotas as a typed document, and the token bucket they use.

A principal is who sent an inference request: the API key's name, else ``addr:<client address>``
(gateway.http.clients). The document an operator sends (``--limits FILE``, ``PUT /admin/limits``)::

    {
      "default": {"requests_per_s": 20, "burst": 40, "rows_per_s": 2000, "rows_per_day": 1000000},
      "models":  {"heavy": {"requests_per_s": 2}},
      "keys":    {"partner-a": {"requests_per_s": 200, "burst": 400, "rows_per_day": null}}
    }

Every field of a rule is optional; absent, a rule inherits it, and ``null`` means "unlimited".
The rule of a (principal, model) pair is overlaid field by field: ``default``, then
``models[model]``, then ``keys[principal]`` (a key's own terms win over a model's). Fields:

- ``requests_per_s`` (> 0) and ``burst`` (requests, >= 1; default ``ceil(requests_per_s)``):
  a token bucket of ``burst`` requests refilled at ``requests_per_s``.
- ``rows_per_s`` and ``rows_burst`` (default ``ceil(rows_per_s)``): the same, counted in rows
  (the first axis of the request's first input).
- ``rows_per_day``: rows per principal and model per UTC day.

Buckets are kept per (principal, model). ``parse_limits`` validates the whole document at once
and raises ``PolicyError`` naming the field (the gateway answers 400); nothing is half applied.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from router.policy.policies import PolicyError

MAX_RULES = 1000  # per section (keys, models)
MAX_NAME = 128  # characters of a key or model name
MAX_RATE = 1e9
DAY_S = 86_400
_SECTIONS = ("default", "models", "keys")
# Buckets one replica keeps without Redis (or while it is down); the least recently used go
# first (a principal whose bucket is dropped starts again full: at most one burst more).
MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Rule:
    """One set of limits; None is "unlimited". ``burst`` and ``rows_burst`` None with a rate set
    mean the default burst (``ceil(rate)``)."""

    requests_per_s: float | None = None
    burst: int | None = None
    rows_per_s: float | None = None
    rows_burst: int | None = None
    rows_per_day: int | None = None

    @property
    def request_burst(self) -> int:
        assert self.requests_per_s is not None
        return self.burst or max(1, math.ceil(self.requests_per_s))

    @property
    def row_burst(self) -> int:
        assert self.rows_per_s is not None
        return self.rows_burst or max(1, math.ceil(self.rows_per_s))

    @property
    def limits_rows(self) -> bool:
        return self.rows_per_s is not None or self.rows_per_day is not None

    @property
    def empty(self) -> bool:
        return self.requests_per_s is None and not self.limits_rows

    def share(self, n: int) -> Rule:
        """This rule divided among ``n`` replicas (each one's part when they cannot agree)."""
        if n <= 1:
            return self

        def part(v: float | int | None) -> Any:
            return None if v is None else max(1, v // n) if isinstance(v, int) else v / n

        return Rule(*(part(getattr(self, f.name)) for f in fields(self)))

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Partial:
    """A rule as written: only the fields it sets."""

    values: tuple[tuple[str, float | int | None], ...]

    def over(self, rule: Rule) -> Rule:
        changes: dict[str, Any] = dict(self.values)
        return replace(rule, **changes)

    def as_json(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass(frozen=True, slots=True)
class LimitsDoc:
    default: Partial
    models: Mapping[str, Partial]
    keys: Mapping[str, Partial]

    def rule(self, principal: str, model: str) -> Rule | None:
        """The limits of ``principal`` on ``model``; None when none applies."""
        rule = self.default.over(Rule())
        if model in self.models:
            rule = self.models[model].over(rule)
        if principal in self.keys:
            rule = self.keys[principal].over(rule)
        return None if rule.empty else rule

    def as_json(self) -> dict[str, Any]:
        return {
            "default": self.default.as_json(),
            "models": {m: p.as_json() for m, p in sorted(self.models.items())},
            "keys": {k: p.as_json() for k, p in sorted(self.keys.items())},
        }


def parse_limits(raw: Any) -> LimitsDoc:
    if not isinstance(raw, dict):
        raise PolicyError("limits", "must be a JSON object")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise PolicyError(unknown[0], f"unknown field (expected {', '.join(_SECTIONS)})")
    default = _partial(raw.get("default", {}), "default")
    sections: dict[str, dict[str, Partial]] = {}
    for section in ("models", "keys"):
        entries = raw.get(section, {})
        if not isinstance(entries, dict):
            raise PolicyError(section, "must be an object of name -> rule")
        if len(entries) > MAX_RULES:
            raise PolicyError(section, f"at most {MAX_RULES} rules, got {len(entries)}")
        out: dict[str, Partial] = {}
        for name, rule in entries.items():
            if not name or len(name) > MAX_NAME:
                raise PolicyError(
                    f"{section}.{name[:MAX_NAME]}", f"names are 1 to {MAX_NAME} characters"
                )
            out[name] = _partial(rule, f"{section}.{name}")
        sections[section] = out
    return LimitsDoc(default, sections["models"], sections["keys"])


def _partial(raw: Any, where: str) -> Partial:
    if not isinstance(raw, dict):
        raise PolicyError(where, "must be an object (a rule)")
    names = [f.name for f in fields(Rule)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}", f"unknown field (expected {', '.join(names)})")
    values: list[tuple[str, float | int | None]] = []
    for name in names:
        if name not in raw:
            continue
        value = raw[name]
        field = f"{where}.{name}"
        if value is None:
            values.append((name, None))
        elif name in ("requests_per_s", "rows_per_s"):
            if type(value) not in (int, float) or not 0 < value <= MAX_RATE:
                raise PolicyError(field, f"must be a number in (0, {MAX_RATE:g}] or null")
            values.append((name, float(value)))
        else:
            if type(value) is not int or not 1 <= value <= 1 << 53:
                raise PolicyError(field, "must be a positive integer or null")
            values.append((name, value))
    return Partial(tuple(values))


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``tokens`` at time ``at``; refills at ``rate`` up to ``capacity``."""

    tokens: float
    at: float

    def peek(self, cost: float, rate: float, capacity: float, now: float) -> float:
        """Refill to ``now``; 0.0 when ``cost`` tokens are there (the caller takes them), else
        the seconds until they will be. A cost above the capacity never passes: ``inf``."""
        self.tokens = min(capacity, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now
        if cost <= self.tokens:
            return 0.0
        if cost > capacity:
            return math.inf
        return (cost - self.tokens) / rate


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is over its limits: ``which`` of ``requests``, ``rows`` or ``day`` (the
    quota), the seconds until it could pass (``inf``: a request larger than the bucket never
    can) and what is left of that limit."""

    which: str
    wait_s: float
    remaining: int


class LocalLimiter:
    """The buckets and daily counts of one replica, keyed by (principal, model). ``take`` is all
    or nothing: a refused request takes from no bucket. The Redis script
    (router.state.redis_store.TAKE_LIMITS) does the same for the fleet."""

    def __init__(self, max_buckets: int = MAX_BUCKETS) -> None:
        self._max = max_buckets
        # (principal, model) -> [requests bucket, rows bucket, UTC day, rows taken that day]
        self._state: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    def take(self, principal: str, model: str, rule: Rule, rows: int, now: float) -> Refusal | None:
        key = (principal, model)
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = [None, None, -1, 0]
            if len(self._state) > self._max:
                self._state.popitem(last=False)
        else:
            self._state.move_to_end(key)
        day = int(now // DAY_S)
        if state[2] != day:
            state[2], state[3] = day, 0
        if rule.requests_per_s is not None:
            cap = rule.request_burst
            bucket = state[0] = state[0] or Bucket(cap, now)
            wait = bucket.peek(1, rule.requests_per_s, cap, now)
            if wait:
                return Refusal("requests", wait, int(bucket.tokens))
        if rule.rows_per_s is not None:
            cap = rule.row_burst
            bucket = state[1] = state[1] or Bucket(cap, now)
            wait = bucket.peek(rows, rule.rows_per_s, cap, now)
            if wait:
                return Refusal("rows", wait, int(bucket.tokens))
        if rule.rows_per_day is not None and state[3] + rows > rule.rows_per_day:
            return Refusal("day", (day + 1) * DAY_S - now, rule.rows_per_day - state[3])
        if state[0] is not None and rule.requests_per_s is not None:
            state[0].tokens -= 1
        if state[1] is not None and rule.rows_per_s is not None:
            state[1].tokens -= rows
        state[3] += rows
        return None
