"""Routing decisions: pure values, no I/O.

A policy is immutable once built (the gateway swaps it whole when the document changes) and its
``choose`` costs a few hundred nanoseconds. Randomness comes from a generator the policy owns.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.policy.hashing import arm_prefix, rendezvous


class PolicyError(ValueError):
    """A policy document, action or reward is invalid; ``field`` names the offending field.

    The gateway maps it to 400 Bad Request.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ActionConflict(PolicyError):
    """The action does not apply to the policy's strategy or state (the gateway maps it to 409)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Which version answers, which versions get a copy, and the probability of this choice."""

    version: str
    shadows: tuple[str, ...] = ()
    propensity: float = 1.0
    arm_role: str = "primary"


class Policy(Protocol):
    @property
    def sticky(self) -> str | None:
        """The sticky key source (``header:<name>`` / ``parameter:<name>``), or None."""
        ...

    def choose(self, key: str | None) -> Decision: ...

    def shares(self) -> dict[str, float]:
        """Expected share of answered traffic per version (shadow copies not counted)."""
        ...

    def versions(self) -> frozenset[str]:
        """Every version this policy can send traffic to, shadows included."""
        ...


@dataclass(frozen=True, slots=True)
class Arm:
    version: str
    weight: float
    role: str = "arm"


@dataclass(frozen=True, slots=True)
class Split:
    """Weighted split over arms: single, blue-green, canary and A/B are all a Split.

    ``choose(key)`` with a key assigns by weighted rendezvous hashing of (salt, arm, key) (see
    ``router.policy.hashing``), so a key keeps its arm on every replica and across restarts, and
    weight changes move as few keys as possible; without a key it draws from ``rng``. The decision's
    propensity is the arm's normalised weight: the probability over requests (or over keys, when
    hashed) of landing on that arm. Arms of weight 0 receive nothing.
    """

    arms: tuple[Arm, ...]
    sticky: str | None = None
    salt: str = ""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    _decisions: tuple[Decision, ...] = field(init=False, repr=False, compare=False)
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _weights: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [arm.version for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm versions must be distinct, got {names}")
        if any(not arm.weight >= 0.0 for arm in self.arms):
            raise ValueError("arm weights must be >= 0")
        total = sum(arm.weight for arm in self.arms)
        if total <= 0.0:
            raise ValueError("at least one arm needs a positive weight")
        live = [arm for arm in self.arms if arm.weight > 0.0]
        cumulative, running = [], 0.0
        for arm in live:
            running += arm.weight / total
            cumulative.append(running)
        decisions = tuple(
            Decision(arm.version, propensity=arm.weight / total, arm_role=arm.role) for arm in live
        )
        object.__setattr__(self, "_decisions", decisions)
        object.__setattr__(self, "_cumulative", tuple(cumulative))
        object.__setattr__(self, "_prefixes", tuple(arm_prefix(self.salt, a.version) for a in live))
        object.__setattr__(self, "_weights", tuple(arm.weight for arm in live))

    def choose(self, key: str | None) -> Decision:
        decisions = self._decisions
        if len(decisions) == 1:
            return decisions[0]
        if key is not None:
            return decisions[rendezvous(key, self._prefixes, self._weights)]
        r = self.rng.random()
        for i, edge in enumerate(self._cumulative):
            if r < edge:
                return decisions[i]
        return decisions[-1]  # r within rounding of 1.0

    def shares(self) -> dict[str, float]:
        total = sum(arm.weight for arm in self.arms)
        return {arm.version: arm.weight / total for arm in self.arms}

    def versions(self) -> frozenset[str]:
        return frozenset(d.version for d in self._decisions)


@dataclass(frozen=True, slots=True)
class Shadow:
    """Wraps any policy; shadow versions receive a copy of a ``sample`` fraction of the traffic
    and never answer it."""

    primary: Policy
    shadows: tuple[str, ...]
    sample: float = 1.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @property
    def sticky(self) -> str | None:
        return self.primary.sticky

    def choose(self, key: str | None) -> Decision:
        d = self.primary.choose(key)
        if self.sample >= 1.0 or self.rng.random() < self.sample:
            return Decision(d.version, self.shadows, d.propensity, d.arm_role)
        return d

    def shares(self) -> dict[str, float]:
        return self.primary.shares()

    def versions(self) -> frozenset[str]:
        return self.primary.versions() | frozenset(self.shadows)


def sticky_key(
    spec: str | None,
    headers: Mapping[str, str],
    parameters: Mapping[str, Any],
    principal: str | None = None,
) -> str | None:
    """The request's sticky key named by ``spec`` (``header:<name>``, ``parameter:<name>``, or
    ``principal``: who sent it, gateway.http.clients.principal_of).

    Header names match case-insensitively. A missing or empty value, or a parameter that is not a
    string or an integer, gives None: the request is then assigned at random.
    """
    if spec is None:
        return None
    if spec == "principal":
        return principal
    source, _, name = spec.partition(":")
    if source == "header":
        value = headers.get(name)
        if value is None:
            lowered = name.lower()
            value = next((v for k, v in headers.items() if k.lower() == lowered), None)
        return value or None
    if source == "parameter":
        raw = parameters.get(name)
        if isinstance(raw, str):
            return raw or None
        if isinstance(raw, int) and not isinstance(raw, bool):
            return str(raw)
        return None
    raise ValueError(f"sticky must be 'header:<name>' or 'parameter:<name>', got {spec!r}")
