"""Policy documents as typed values: one class per strategy, each the single home of its rules.

A document is the JSON object an operator sends, e.g.
``{"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05}``.
``parse_policy`` validates it once, at the edge, and returns a ``PolicyDoc`` (defaults filled
in, numbers as floats); ``as_json()`` gives back the normalised object that stores persist, and
parsing that again gives an equal document. Each strategy's class says which versions it
routes to (``primary_versions``), which it puts under test (``subjects``), which actions apply
(``apply``), what a guard's breach leads to (``without``) and how it routes (``policy``). Every
error is a ``PolicyError`` naming the field (dotted for nested fields: ``shadow.sample``,
``arms.2``); actions that do not fit the strategy or state raise its subclass
``ActionConflict``.

Canary semantics: ``advance`` moves ``weight`` to the first step greater than it; advancing
past the last step promotes (the candidate becomes ``single``), so repeated ``advance`` ends
the rollout. A paused canary keeps its weights and refuses ``advance``; ``promote`` and
``rollback`` work whether paused or not. Shadow versions must differ from every version the
primary policy names (a blue-green standby included), so every action yields a valid document.

Optional fields: any strategy may carry ``shadow``, ``seed`` (a non-negative int seeding the
policy's generators, for tests and replays) and ``guards`` (router.policy.guard_spec). The
strategies that take feedback (canary, A/B, bandit) may carry ``reward_range``: ``[low, high]``,
the rewards accepted (default ``[0, 1]``; finite, low < high, magnitudes at most 1e9 so sums of
squares stay exact enough; a bandit's within [0, 1], as its Beta posteriors need).
Canary: ``steps`` (default 0.05, 0.25, 0.5, 1.0), ``weight`` (default the first step),
``paused``, ``sticky``. Canary and A/B: ``sticky`` (``header:<name>``, lower-cased,
``parameter:<name>``, or ``principal``: the API key's name, else the client address) and
``salt`` (a string; changing it reshuffles sticky assignment, e.g. for a new experiment on the
same versions). Bandit: ``algorithm`` (default thompson), ``min_share`` (default 0),
``epsilon`` (epsilon_greedy only, default 0.1).

Sizes are capped (each routed request and each audit entry carries the document): at most
``MAX_STEPS`` steps, ``MAX_ARMS`` arms, ``MAX_SHADOWS`` shadow versions, version names of
``MAX_VERSION_CHARS`` and ``sticky``/``salt`` of ``MAX_STICKY_CHARS`` characters.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

from router.policy.bandit import ALGORITHMS, Algorithm, Bandit
from router.policy.guard_spec import GuardSpec
from router.policy.policies import ActionConflict, Arm, Policy, PolicyError, Shadow, Split

PolicyJson = dict[str, Any]
Action = Literal["advance", "pause", "resume", "promote", "rollback", "switch"]
ACTIONS: tuple[Action, ...] = get_args(Action)
DEFAULT_STEPS = (0.05, 0.25, 0.5, 1.0)
# Caps on what a document may hold: every request routed by it and every audit entry carries it.
MAX_STEPS = 32  # canary steps
MAX_ARMS = 32  # A/B and bandit arms
MAX_SHADOWS = 16  # shadow versions
MAX_VERSION_CHARS = 64  # a version name
MAX_STICKY_CHARS = 256  # sticky and salt
_COMMON = ("strategy", "shadow", "guards", "seed")
DEFAULT_REWARD_RANGE = (0.0, 1.0)
MAX_REWARD = 1e9
# What a guard's breach leads to: the action's audit name (None: no change) and the document.
Change = tuple[str | None, "PolicyDoc"]


@dataclass(frozen=True, slots=True)
class Subject:
    """A version under test and the version it is compared with (None: absolute limits only)."""

    version: str
    baseline: str | None


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    versions: tuple[str, ...]
    sample: float = 1.0

    def as_json(self) -> PolicyJson:
        return {"versions": list(self.versions), "sample": self.sample}


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyDoc:
    """What every strategy may carry. Subclasses add their fields and their rules."""

    strategy: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # the strategy's own JSON fields
    actions: ClassVar[tuple[Action, ...]] = ()
    feedback: ClassVar[bool] = False  # requests remembered for the feedback join
    fixed_shares: ClassVar[bool] = False  # shares are the operator's weights (an SRM test applies)

    shadow: ShadowSpec | None = None
    guards: GuardSpec | None = None
    seed: int | None = None
    reward_range: tuple[float, float] = DEFAULT_REWARD_RANGE  # strategies with feedback only

    def primary_versions(self) -> tuple[str, ...]:
        """The versions this document sends traffic to (shadows apart), in document order."""
        raise NotImplementedError

    def subjects(self) -> tuple[Subject, ...]:
        """What guards judge: canary its candidate against the baseline; blue-green its active
        version; single its version; A/B its weighted arms and bandit its arms, each against
        the first, both on absolute limits (the standby serves nothing to compare with)."""
        raise NotImplementedError

    def shadow_versions(self) -> tuple[str, ...]:
        return self.shadow.versions if self.shadow is not None else ()

    def versions(self) -> frozenset[str]:
        """Every version the document names, standby, zero-weight arms and shadows included:
        the versions that must stay loaded while it is in force."""
        return frozenset(self.primary_versions()) | frozenset(self.shadow_versions())

    def policy(self, salt: str = "") -> Policy:
        """The policy the document describes. Pass the model name as ``salt`` so that sticky
        assignments of different models are independent; a document's own ``salt`` is appended."""
        primary = self._primary(random.Random(self.seed), salt)
        if self.shadow is None:
            return primary
        rng = random.Random(None if self.seed is None else f"shadow:{self.seed}")
        return Shadow(primary, self.shadow.versions, self.shadow.sample, rng)

    def apply(self, action: Action) -> PolicyDoc:
        """The document after ``action``; ActionConflict when it does not apply to the
        strategy or the current state (see the module docstring for the canary rules)."""
        if action not in ACTIONS:
            raise PolicyError(
                "action", f"unknown action {action!r}; expected one of {list(ACTIONS)}"
            )
        if action not in self.actions:
            allowed = list(self.actions) or "none"
            raise ActionConflict(
                "action",
                f"{action!r} does not apply to strategy {self.strategy!r} (applies: {allowed})",
            )
        return self._apply(action)

    def without(
        self, bad: Collection[str], last_change_by_guard: bool
    ) -> tuple[str | None, PolicyDoc]:
        """What a guard's breach by the ``bad`` versions leads to: the action's audit name and
        the document after it, or ``(None, self)`` when nothing healthier can take the traffic
        (never below one serving version)."""
        return None, self

    def with_shadow(self, shadow: ShadowSpec | None) -> PolicyDoc:
        return dataclasses.replace(self, shadow=shadow)

    def as_json(self) -> PolicyJson:
        out: PolicyJson = {"strategy": self.strategy, **self._json()}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.shadow is not None:
            out["shadow"] = self.shadow.as_json()
        if self.guards is not None:
            out["guards"] = self.guards.as_doc()
        if self.reward_range != DEFAULT_REWARD_RANGE:
            out["reward_range"] = list(self.reward_range)
        return out

    # -- for subclasses ---------------------------------------------------------------------
    def _primary(self, rng: random.Random, salt: str) -> Policy:
        raise NotImplementedError

    def _apply(self, action: Action) -> PolicyDoc:
        raise NotImplementedError

    def _json(self) -> PolicyJson:
        raise NotImplementedError

    def _single(self, version: str) -> SingleDoc:
        """The document that sends everything to ``version``, keeping shadow, guards, seed."""
        return SingleDoc(version=version, shadow=self.shadow, guards=self.guards, seed=self.seed)


@dataclass(frozen=True, slots=True, kw_only=True)
class SingleDoc(PolicyDoc):
    strategy: ClassVar[str] = "single"
    fields: ClassVar[tuple[str, ...]] = ("version",)
    version: str

    def primary_versions(self) -> tuple[str, ...]:
        return (self.version,)

    def subjects(self) -> tuple[Subject, ...]:
        return (Subject(self.version, None),)

    def _primary(self, rng: random.Random, salt: str) -> Policy:
        return Split((Arm(self.version, 1.0, "primary"),), rng=rng)

    def _json(self) -> PolicyJson:
        return {"version": self.version}


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryDoc(PolicyDoc):
    strategy: ClassVar[str] = "canary"
    fields: ClassVar[tuple[str, ...]] = (
        "baseline", "candidate", "weight", "steps", "paused", "sticky", "salt",
    )  # fmt: skip
    actions: ClassVar[tuple[Action, ...]] = ("advance", "pause", "resume", "promote", "rollback")
    feedback: ClassVar[bool] = True
    fixed_shares: ClassVar[bool] = True
    baseline: str
    candidate: str
    weight: float
    steps: tuple[float, ...] = DEFAULT_STEPS
    paused: bool = False
    sticky: str | None = None
    salt: str | None = None

    def primary_versions(self) -> tuple[str, ...]:
        return (self.baseline, self.candidate)

    def subjects(self) -> tuple[Subject, ...]:
        return (Subject(self.candidate, self.baseline),)

    def _primary(self, rng: random.Random, salt: str) -> Policy:
        w = self.weight
        ramp = (Arm(self.baseline, 1.0 - w, "baseline"), Arm(self.candidate, w, "candidate"))
        return Split(ramp, self.sticky, _salted(salt, self.salt), rng)

    def _apply(self, action: Action) -> PolicyDoc:
        if action == "promote":
            return self._single(self.candidate)
        if action == "rollback":
            return self._single(self.baseline)
        if action == "pause" and self.paused:
            raise ActionConflict("paused", "the canary is already paused")
        if action == "resume" and not self.paused:
            raise ActionConflict("paused", "the canary is not paused")
        if action in ("pause", "resume"):
            return dataclasses.replace(self, paused=action == "pause")
        if self.paused:
            raise ActionConflict("paused", "the canary is paused; resume it before advancing")
        later = [s for s in self.steps if s > self.weight]
        if not later:
            return self._single(self.candidate)
        return dataclasses.replace(self, weight=later[0])

    def without(
        self, bad: Collection[str], last_change_by_guard: bool
    ) -> tuple[str | None, PolicyDoc]:
        if self.candidate in bad:
            return "rollback", self._single(self.baseline)
        return None, self

    def _json(self) -> PolicyJson:
        out: PolicyJson = {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "weight": self.weight,
            "steps": list(self.steps),
            "paused": self.paused,
        }
        return out | _sticky_json(self.sticky, self.salt)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlueGreenDoc(PolicyDoc):
    strategy: ClassVar[str] = "blue_green"
    fields: ClassVar[tuple[str, ...]] = ("active", "standby")
    actions: ClassVar[tuple[Action, ...]] = ("switch",)
    active: str
    standby: str

    def primary_versions(self) -> tuple[str, ...]:
        return (self.active, self.standby)

    def subjects(self) -> tuple[Subject, ...]:
        return (Subject(self.active, None),)

    def _primary(self, rng: random.Random, salt: str) -> Policy:
        return Split((Arm(self.active, 1.0, "active"), Arm(self.standby, 0.0, "standby")))

    def _apply(self, action: Action) -> PolicyDoc:
        return dataclasses.replace(self, active=self.standby, standby=self.active)

    def without(
        self, bad: Collection[str], last_change_by_guard: bool
    ) -> tuple[str | None, PolicyDoc]:
        # a guard does not switch back a switch a guard made: no flapping between two bad versions
        if self.active in bad and not last_change_by_guard:
            return "switch", self._apply("switch")
        return None, self

    def _json(self) -> PolicyJson:
        return {"active": self.active, "standby": self.standby}


@dataclass(frozen=True, slots=True, kw_only=True)
class ABDoc(PolicyDoc):
    strategy: ClassVar[str] = "ab"
    fields: ClassVar[tuple[str, ...]] = ("arms", "sticky", "salt")
    feedback: ClassVar[bool] = True
    fixed_shares: ClassVar[bool] = True
    arms: tuple[tuple[str, float], ...]  # (version, weight) in document order
    sticky: str | None = None
    salt: str | None = None

    def primary_versions(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.arms)

    def subjects(self) -> tuple[Subject, ...]:
        return _against_first([v for v, w in self.arms if w > 0])

    def _primary(self, rng: random.Random, salt: str) -> Policy:
        arms = tuple(Arm(v, w, "arm") for v, w in self.arms)
        return Split(arms, self.sticky, _salted(salt, self.salt), rng)

    def without(
        self, bad: Collection[str], last_change_by_guard: bool
    ) -> tuple[str | None, PolicyDoc]:
        """Breaching arms get weight 0, the others are renormalised."""
        if not any(v in bad and w > 0 for v, w in self.arms):
            return None, self
        weights = [(v, 0.0 if v in bad else w) for v, w in self.arms]
        total = math.fsum(w for _, w in weights)
        if total <= 0.0:  # every weighted arm breached: nothing healthier to send traffic to
            return None, self
        return "drop_arm", dataclasses.replace(self, arms=tuple((v, w / total) for v, w in weights))

    def _json(self) -> PolicyJson:
        return {"arms": dict(self.arms)} | _sticky_json(self.sticky, self.salt)


@dataclass(frozen=True, slots=True, kw_only=True)
class BanditDoc(PolicyDoc):
    strategy: ClassVar[str] = "bandit"
    fields: ClassVar[tuple[str, ...]] = ("arms", "algorithm", "min_share", "epsilon")
    feedback: ClassVar[bool] = True
    arms: tuple[str, ...]
    algorithm: Algorithm = "thompson"
    min_share: float = 0.0
    epsilon: float | None = None  # epsilon_greedy only

    def primary_versions(self) -> tuple[str, ...]:
        return self.arms

    def subjects(self) -> tuple[Subject, ...]:
        return _against_first(list(self.arms))

    def _primary(self, rng: random.Random, salt: str) -> Policy:
        return Bandit.fresh(
            self.arms,
            self.algorithm,
            min_share=self.min_share,
            epsilon=0.1 if self.epsilon is None else self.epsilon,
            seed=self.seed,
        )

    def without(
        self, bad: Collection[str], last_change_by_guard: bool
    ) -> tuple[str | None, PolicyDoc]:
        """Breaching arms leave the bandit; with one arm left it becomes ``single``."""
        arms = tuple(v for v in self.arms if v not in bad)
        if len(arms) == len(self.arms) or not arms:
            return None, self
        if len(arms) == 1:
            return "drop_arm", self._single(arms[0])
        return "drop_arm", dataclasses.replace(self, arms=arms)

    def _json(self) -> PolicyJson:
        out: PolicyJson = {
            "arms": list(self.arms),
            "algorithm": self.algorithm,
            "min_share": self.min_share,
        }
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        return out


STRATEGIES: dict[str, type[PolicyDoc]] = {
    c.strategy: c for c in (SingleDoc, CanaryDoc, BlueGreenDoc, ABDoc, BanditDoc)
}


def parse_policy(raw: Any, loaded_versions: Collection[str] | None = None) -> PolicyDoc:
    """Validate a JSON document; with ``loaded_versions``, every version it names must be among
    them (documents read back from a store were checked when written and are parsed without)."""
    loaded = None if loaded_versions is None else frozenset(loaded_versions)
    if not isinstance(raw, Mapping):
        raise PolicyError("policy", "must be a JSON object")
    strategy = raw.get("strategy")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise PolicyError("strategy", f"must be one of {list(STRATEGIES)}, got {strategy!r}")
    kind = STRATEGIES[strategy]
    own_fields = (*kind.fields, "reward_range") if kind.feedback else kind.fields
    unknown = [k for k in raw if k not in _COMMON and k not in own_fields]
    if unknown:
        allowed = [*_COMMON, *own_fields]
        raise PolicyError(
            ", ".join(map(str, unknown)),
            f"unknown field for strategy {strategy!r} (allowed: {', '.join(allowed)})",
        )
    own = _PARSERS[strategy](raw, loaded)
    seed = raw.get("seed")
    if "seed" in raw and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise PolicyError("seed", f"must be a non-negative integer, got {seed!r}")
    primary = frozenset(own.primary_versions())
    shadow = _shadow(raw["shadow"], primary, loaded) if "shadow" in raw else None
    guards = GuardSpec.parse(raw["guards"]) if "guards" in raw else None
    rewards = _reward_range(raw["reward_range"], kind) if "reward_range" in raw else None
    return dataclasses.replace(
        own, seed=seed, shadow=shadow, guards=guards, reward_range=rewards or DEFAULT_REWARD_RANGE
    )


# -- validation, one parser per strategy --------------------------------------------------------
def _parse_single(raw: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    return SingleDoc(version=_version(raw.get("version"), "version", loaded))


def _parse_blue_green(raw: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    active = _version(raw.get("active"), "active", loaded)
    standby = _version(raw.get("standby"), "standby", loaded)
    if active == standby:
        raise PolicyError("standby", "must differ from active")
    return BlueGreenDoc(active=active, standby=standby)


def _parse_canary(raw: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    baseline = _version(raw.get("baseline"), "baseline", loaded)
    candidate = _version(raw.get("candidate"), "candidate", loaded)
    if candidate == baseline:
        raise PolicyError("candidate", "must differ from baseline")
    raw_steps = raw.get("steps", list(DEFAULT_STEPS))
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PolicyError("steps", "must be a non-empty list of weights")
    _at_most(raw_steps, MAX_STEPS, "steps", "steps")
    steps = [_number(s, f"steps.{i}") for i, s in enumerate(raw_steps)]
    for i, s in enumerate(steps):
        if not 0.0 < s <= 1.0:
            raise PolicyError(f"steps.{i}", f"must be in (0, 1], got {s}")
        if i and s <= steps[i - 1]:
            raise PolicyError(f"steps.{i}", f"steps must increase strictly, got {steps}")
    weight = _fraction(raw, "weight", default=steps[0])
    paused = raw.get("paused", False)
    if not isinstance(paused, bool):
        raise PolicyError("paused", f"must be true or false, got {paused!r}")
    sticky, salt = _sticky(raw)
    return CanaryDoc(
        baseline=baseline, candidate=candidate, weight=weight, steps=tuple(steps),
        paused=paused, sticky=sticky, salt=salt,
    )  # fmt: skip


def _parse_ab(raw: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    arms = raw.get("arms")
    if not isinstance(arms, Mapping) or len(arms) < 2:
        raise PolicyError("arms", 'must map at least two versions to weights: {"1": 0.5, ...}')
    _at_most(arms, MAX_ARMS, "arms", "arms")
    weights: list[tuple[str, float]] = []
    for version in arms:
        _version(version, f"arms.{version}", loaded)
        weights.append((version, _fraction(arms, version, prefix="arms.")))
    total = math.fsum(w for _, w in weights)
    if abs(total - 1.0) > 1e-9:
        raise PolicyError("arms", f"weights must sum to 1, got {total!r}")
    sticky, salt = _sticky(raw)
    return ABDoc(arms=tuple(weights), sticky=sticky, salt=salt)


def _parse_bandit(raw: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    arms = raw.get("arms")
    if not isinstance(arms, list) or len(arms) < 2:
        raise PolicyError("arms", 'must list at least two versions: ["1", "2"]')
    _at_most(arms, MAX_ARMS, "arms", "arms")
    for i, version in enumerate(arms):
        _version(version, f"arms.{i}", loaded)
    if len(set(arms)) != len(arms):
        raise PolicyError("arms", f"versions must be distinct, got {arms}")
    algorithm = raw.get("algorithm", "thompson")
    if algorithm not in ALGORITHMS:
        raise PolicyError("algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    min_share = _fraction(raw, "min_share", default=0.0)
    if min_share * len(arms) > 1.0:
        raise PolicyError(
            "min_share", f"{len(arms)} arms x min_share {min_share} exceeds 1 (max 1/{len(arms)})"
        )
    if "epsilon" in raw and algorithm != "epsilon_greedy":
        raise PolicyError("epsilon", "applies only to algorithm 'epsilon_greedy'")
    epsilon = _fraction(raw, "epsilon", default=0.1) if algorithm == "epsilon_greedy" else None
    return BanditDoc(
        arms=tuple(arms), algorithm=cast(Algorithm, algorithm), min_share=min_share, epsilon=epsilon
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any], frozenset[str] | None], PolicyDoc]] = {
    "single": _parse_single,
    "canary": _parse_canary,
    "blue_green": _parse_blue_green,
    "ab": _parse_ab,
    "bandit": _parse_bandit,
}


def _shadow(raw: Any, primary: frozenset[str], loaded: frozenset[str] | None) -> ShadowSpec:
    if not isinstance(raw, Mapping):
        raise PolicyError("shadow", 'must be an object: {"versions": [...], "sample": 1.0}')
    unknown = [k for k in raw if k not in ("versions", "sample")]
    if unknown:
        raise PolicyError(f"shadow.{unknown[0]}", "unknown field (allowed: versions, sample)")
    versions = raw.get("versions")
    if not isinstance(versions, list) or not versions:
        raise PolicyError("shadow.versions", "must be a non-empty list of versions")
    _at_most(versions, MAX_SHADOWS, "shadow.versions", "versions")
    for i, version in enumerate(versions):
        field = f"shadow.versions.{i}"
        _version(version, field, loaded)
        if version in primary:
            raise PolicyError(field, f"{version!r} already serves traffic in this policy")
    if len(set(versions)) != len(versions):
        raise PolicyError("shadow.versions", f"versions must be distinct, got {versions}")
    return ShadowSpec(tuple(versions), _fraction(raw, "sample", "shadow.", 1.0))


def _reward_range(raw: Any, kind: type[PolicyDoc]) -> tuple[float, float]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise PolicyError("reward_range", f"must be [low, high], got {raw!r}")
    low, high = (_number(v, f"reward_range.{i}") for i, v in enumerate(raw))
    if not -MAX_REWARD <= low < high <= MAX_REWARD:
        raise PolicyError(
            "reward_range", f"must have low < high, both within ±{MAX_REWARD:g}, got {raw!r}"
        )
    if kind is BanditDoc and not 0.0 <= low < high <= 1.0:
        raise PolicyError(
            "reward_range",
            f"a bandit's rewards must lie within [0, 1] (its Beta posteriors count them as "
            f"successes), got {raw!r}",
        )
    return low, high


def _sticky(raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    for field in ("sticky", "salt"):
        if field in raw and not isinstance(raw[field], str):
            raise PolicyError(field, f"must be a string, got {raw[field]!r}")
        if field in raw and len(raw[field]) > MAX_STICKY_CHARS:
            raise PolicyError(field, f"at most {MAX_STICKY_CHARS} characters")
    salt: str | None = raw.get("salt")
    if "sticky" not in raw:
        return None, salt
    if raw["sticky"] == "principal":
        return "principal", salt
    source, _, name = raw["sticky"].partition(":")
    if source not in ("header", "parameter") or not name:
        raise PolicyError(
            "sticky",
            f"must be 'header:<name>', 'parameter:<name>' or 'principal', got {raw['sticky']!r}",
        )
    # HTTP header names are case-insensitive; ASGI servers hand them over lower-cased.
    return (f"header:{name.lower()}" if source == "header" else raw["sticky"]), salt


def _sticky_json(sticky: str | None, salt: str | None) -> PolicyJson:
    out: PolicyJson = {}
    if salt is not None:
        out["salt"] = salt
    if sticky is not None:
        out["sticky"] = sticky
    return out


def _salted(salt: str, own: str | None) -> str:
    return salt if own is None else f"{salt}/{own}"


def _against_first(arms: list[str]) -> tuple[Subject, ...]:
    return tuple(Subject(v, None if v == arms[0] else arms[0]) for v in arms)


def _version(value: Any, field: str, loaded: frozenset[str] | None) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(field, f"must be a non-empty version string, got {value!r}")
    if len(value) > MAX_VERSION_CHARS:
        raise PolicyError(field, f"a version name has at most {MAX_VERSION_CHARS} characters")
    if loaded is not None and value not in loaded:
        raise PolicyError(field, f"version {value!r} is not loaded (loaded: {sorted(loaded)})")
    return value


def _at_most(items: Collection[Any], cap: int, field: str, what: str) -> None:
    if len(items) > cap:
        raise PolicyError(field, f"at most {cap} {what}, got {len(items)}")


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(field, f"must be a number, got {value!r}")
    return float(value)


def _fraction(
    doc: Mapping[str, Any], field: str, prefix: str = "", default: float | None = None
) -> float:
    if field not in doc and default is not None:
        return default
    value = _number(doc.get(field), prefix + field)
    if not 0.0 <= value <= 1.0:
        raise PolicyError(prefix + field, f"must be in [0, 1], got {value}")
    return value
