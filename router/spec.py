"""Policy documents: validation, building and actions.

A document is the JSON object an operator sends, e.g.
``{"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05}``.
``parse_policy`` validates it and returns a normalised copy (defaults filled in, numbers as
floats) that is what stores persist; ``build_policy`` turns a document into an immutable
``Policy``; ``apply_action`` returns the document an action leads to. Every error is a
``PolicyError`` naming the field (dotted for nested fields: ``shadow.sample``, ``arms.2``);
actions that do not fit the strategy or state raise its subclass ``ActionConflict``.

Canary semantics: ``advance`` moves ``weight`` to the first step greater than it; advancing
past the last step promotes (the candidate becomes ``single``), so repeated ``advance`` ends
the rollout. A paused canary keeps its weights and refuses ``advance``; ``promote`` and
``rollback`` work whether paused or not. Shadow versions must differ from every version the
primary policy names (a blue-green standby included), so every action yields a valid document.

Optional fields: any strategy may carry ``shadow``, ``seed`` (a non-negative int seeding the
policy's generators, for tests and replays) and ``guards`` (validated by router.guards).
Canary: ``steps`` (default 0.05, 0.25, 0.5, 1.0), ``weight`` (default the first step),
``paused``, ``sticky``. Canary and A/B: ``sticky`` (``header:<name>``, lower-cased, or
``parameter:<name>``) and ``salt`` (a string; changing it reshuffles sticky assignment, e.g.
for a new experiment on the same versions). Bandit: ``algorithm`` (default thompson),
``min_share`` (default 0), ``epsilon`` (epsilon_greedy only, default 0.1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from typing import Any, Literal, get_args

from router.bandit import ALGORITHMS, Bandit
from router.policies import ActionConflict, Arm, Policy, PolicyError, Shadow, Split

PolicyDoc = dict[str, Any]
Action = Literal["advance", "pause", "resume", "promote", "rollback", "switch"]
ACTIONS: tuple[Action, ...] = get_args(Action)
DEFAULT_STEPS = (0.05, 0.25, 0.5, 1.0)

_COMMON = ("strategy", "shadow", "guards", "seed")
_FIELDS: dict[str, tuple[str, ...]] = {
    "single": ("version",),
    "canary": ("baseline", "candidate", "weight", "steps", "paused", "sticky", "salt"),
    "blue_green": ("active", "standby"),
    "ab": ("arms", "sticky", "salt"),
    "bandit": ("arms", "algorithm", "min_share", "epsilon"),
}
_VERSION_FIELDS = {
    "single": ("version",),
    "canary": ("baseline", "candidate"),
    "blue_green": ("active", "standby"),
}
_ACTIONS_BY_STRATEGY: dict[str, tuple[Action, ...]] = {
    "single": (),
    "canary": ("advance", "pause", "resume", "promote", "rollback"),
    "blue_green": ("switch",),
    "ab": (),
    "bandit": (),
}


def parse_policy(doc: Mapping[str, Any], loaded_versions: Collection[str]) -> PolicyDoc:
    """Validate ``doc`` against the model's loaded versions; return the normalised document."""
    return _normalize(doc, frozenset(loaded_versions))


def build_policy(doc: Mapping[str, Any], *, salt: str = "") -> Policy:
    """The policy a document describes. Pass the model name as ``salt`` so that sticky
    assignments of different models are independent; a document's own ``salt`` is appended."""
    d = _normalize(doc, None)
    seed: int | None = d.get("seed")
    rng = random.Random(seed)
    full_salt = f"{salt}/{d['salt']}" if "salt" in d else salt
    strategy = d["strategy"]
    primary: Policy
    if strategy == "single":
        primary = Split((Arm(d["version"], 1.0, "primary"),), rng=rng)
    elif strategy == "blue_green":
        primary = Split((Arm(d["active"], 1.0, "active"), Arm(d["standby"], 0.0, "standby")))
    elif strategy == "canary":
        w = d["weight"]
        ramp = (Arm(d["baseline"], 1.0 - w, "baseline"), Arm(d["candidate"], w, "candidate"))
        primary = Split(ramp, d.get("sticky"), full_salt, rng)
    elif strategy == "ab":
        arms = tuple(Arm(v, w, "arm") for v, w in d["arms"].items())
        primary = Split(arms, d.get("sticky"), full_salt, rng)
    else:
        primary = Bandit.fresh(
            d["arms"],
            d["algorithm"],
            min_share=d["min_share"],
            epsilon=d.get("epsilon", 0.1),
            seed=seed,
        )
    if "shadow" not in d:
        return primary
    shadow_rng = random.Random(None if seed is None else f"shadow:{seed}")
    return Shadow(primary, tuple(d["shadow"]["versions"]), d["shadow"]["sample"], shadow_rng)


def apply_action(doc: Mapping[str, Any], action: Action) -> PolicyDoc:
    """The document after ``action``; ActionConflict when it does not apply to the strategy or
    the current state (see the module docstring for the canary rules)."""
    if action not in ACTIONS:
        raise PolicyError("action", f"unknown action {action!r}; expected one of {list(ACTIONS)}")
    d = _normalize(doc, None)
    strategy = d["strategy"]
    if action not in _ACTIONS_BY_STRATEGY[strategy]:
        allowed = list(_ACTIONS_BY_STRATEGY[strategy]) or "none"
        raise ActionConflict(
            "action", f"{action!r} does not apply to strategy {strategy!r} (applies: {allowed})"
        )
    kept: PolicyDoc = {k: d[k] for k in ("shadow", "guards", "seed") if k in d}
    if strategy == "blue_green":
        return _normalize({**d, "active": d["standby"], "standby": d["active"]}, None)
    if action == "promote":
        return _normalize({"strategy": "single", "version": d["candidate"], **kept}, None)
    if action == "rollback":
        return _normalize({"strategy": "single", "version": d["baseline"], **kept}, None)
    if action == "pause" and d["paused"]:
        raise ActionConflict("paused", "the canary is already paused")
    if action == "resume" and not d["paused"]:
        raise ActionConflict("paused", "the canary is not paused")
    if action in ("pause", "resume"):
        return {**d, "paused": action == "pause"}
    if d["paused"]:
        raise ActionConflict("paused", "the canary is paused; resume it before advancing")
    later = [s for s in d["steps"] if s > d["weight"]]
    if not later:
        return _normalize({"strategy": "single", "version": d["candidate"], **kept}, None)
    return {**d, "weight": later[0]}


def referenced_versions(doc: Mapping[str, Any]) -> frozenset[str]:
    """Every version a valid document names, standby, zero-weight arms and shadows included:
    the versions that must stay loaded while it is in force."""
    d = _normalize(doc, None)
    return _primary_versions(d) | frozenset(d.get("shadow", {}).get("versions", ()))


def _primary_versions(d: Mapping[str, Any]) -> frozenset[str]:
    if d["strategy"] in _VERSION_FIELDS:
        return frozenset(d[f] for f in _VERSION_FIELDS[d["strategy"]])
    return frozenset(d["arms"])  # ab: the mapping's keys; bandit: the list


def _normalize(doc: Mapping[str, Any], loaded: frozenset[str] | None) -> PolicyDoc:
    if not isinstance(doc, Mapping):
        raise PolicyError("policy", "must be a JSON object")
    strategy = doc.get("strategy")
    if not isinstance(strategy, str) or strategy not in _FIELDS:
        raise PolicyError("strategy", f"must be one of {list(_FIELDS)}, got {strategy!r}")
    unknown = [k for k in doc if k not in _COMMON and k not in _FIELDS[strategy]]
    if unknown:
        allowed = [*_COMMON, *_FIELDS[strategy]]
        raise PolicyError(
            ", ".join(map(str, unknown)),
            f"unknown field for strategy {strategy!r} (allowed: {', '.join(allowed)})",
        )
    out: PolicyDoc = {"strategy": strategy}
    if strategy == "single":
        out["version"] = _version(doc.get("version"), "version", loaded)
    elif strategy == "blue_green":
        out["active"] = _version(doc.get("active"), "active", loaded)
        out["standby"] = _version(doc.get("standby"), "standby", loaded)
        if out["active"] == out["standby"]:
            raise PolicyError("standby", "must differ from active")
    elif strategy == "canary":
        _canary(doc, out, loaded)
    elif strategy == "ab":
        _ab(doc, out, loaded)
    else:
        _bandit(doc, out, loaded)
    if "seed" in doc:
        seed = doc["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise PolicyError("seed", f"must be a non-negative integer, got {seed!r}")
        out["seed"] = seed
    if "shadow" in doc:
        out["shadow"] = _shadow(doc["shadow"], _primary_versions(out), loaded)
    if "guards" in doc:
        from router.guards import parse_guards  # router.guards builds on this module

        out["guards"] = parse_guards(doc["guards"])
    return out


def _canary(doc: Mapping[str, Any], out: PolicyDoc, loaded: frozenset[str] | None) -> None:
    out["baseline"] = _version(doc.get("baseline"), "baseline", loaded)
    out["candidate"] = _version(doc.get("candidate"), "candidate", loaded)
    if out["candidate"] == out["baseline"]:
        raise PolicyError("candidate", "must differ from baseline")
    raw_steps = doc.get("steps", list(DEFAULT_STEPS))
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PolicyError("steps", "must be a non-empty list of weights")
    steps = [_number(s, f"steps.{i}") for i, s in enumerate(raw_steps)]
    for i, s in enumerate(steps):
        if not 0.0 < s <= 1.0:
            raise PolicyError(f"steps.{i}", f"must be in (0, 1], got {s}")
        if i and s <= steps[i - 1]:
            raise PolicyError(f"steps.{i}", f"steps must increase strictly, got {steps}")
    out["weight"] = _fraction(doc, "weight", default=steps[0])
    out["steps"] = steps
    paused = doc.get("paused", False)
    if not isinstance(paused, bool):
        raise PolicyError("paused", f"must be true or false, got {paused!r}")
    out["paused"] = paused
    _sticky(doc, out)


def _ab(doc: Mapping[str, Any], out: PolicyDoc, loaded: frozenset[str] | None) -> None:
    arms = doc.get("arms")
    if not isinstance(arms, Mapping) or len(arms) < 2:
        raise PolicyError("arms", 'must map at least two versions to weights: {"1": 0.5, ...}')
    weights: dict[str, float] = {}
    for version in arms:
        _version(version, f"arms.{version}", loaded)
        weights[version] = _fraction(arms, version, prefix="arms.")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > 1e-9:
        raise PolicyError("arms", f"weights must sum to 1, got {total!r}")
    out["arms"] = weights
    _sticky(doc, out)


def _bandit(doc: Mapping[str, Any], out: PolicyDoc, loaded: frozenset[str] | None) -> None:
    arms = doc.get("arms")
    if not isinstance(arms, list) or len(arms) < 2:
        raise PolicyError("arms", 'must list at least two versions: ["1", "2"]')
    for i, version in enumerate(arms):
        _version(version, f"arms.{i}", loaded)
    if len(set(arms)) != len(arms):
        raise PolicyError("arms", f"versions must be distinct, got {arms}")
    algorithm = doc.get("algorithm", "thompson")
    if algorithm not in ALGORITHMS:
        raise PolicyError("algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    min_share = _fraction(doc, "min_share", default=0.0)
    if min_share * len(arms) > 1.0:
        raise PolicyError(
            "min_share", f"{len(arms)} arms x min_share {min_share} exceeds 1 (max 1/{len(arms)})"
        )
    if "epsilon" in doc and algorithm != "epsilon_greedy":
        raise PolicyError("epsilon", "applies only to algorithm 'epsilon_greedy'")
    out["arms"] = list(arms)
    out["algorithm"] = algorithm
    out["min_share"] = min_share
    if algorithm == "epsilon_greedy":
        out["epsilon"] = _fraction(doc, "epsilon", default=0.1)


def _shadow(raw: Any, primary: frozenset[str], loaded: frozenset[str] | None) -> PolicyDoc:
    if not isinstance(raw, Mapping):
        raise PolicyError("shadow", 'must be an object: {"versions": [...], "sample": 1.0}')
    unknown = [k for k in raw if k not in ("versions", "sample")]
    if unknown:
        raise PolicyError(f"shadow.{unknown[0]}", "unknown field (allowed: versions, sample)")
    versions = raw.get("versions")
    if not isinstance(versions, list) or not versions:
        raise PolicyError("shadow.versions", "must be a non-empty list of versions")
    for i, version in enumerate(versions):
        field = f"shadow.versions.{i}"
        _version(version, field, loaded)
        if version in primary:
            raise PolicyError(field, f"{version!r} already serves traffic in this policy")
    if len(set(versions)) != len(versions):
        raise PolicyError("shadow.versions", f"versions must be distinct, got {versions}")
    return {"versions": list(versions), "sample": _fraction(raw, "sample", "shadow.", 1.0)}


def _sticky(doc: Mapping[str, Any], out: PolicyDoc) -> None:
    for field in ("sticky", "salt"):
        if field in doc and not isinstance(doc[field], str):
            raise PolicyError(field, f"must be a string, got {doc[field]!r}")
    if "salt" in doc:
        out["salt"] = doc["salt"]
    if "sticky" not in doc:
        return
    source, _, name = doc["sticky"].partition(":")
    if source not in ("header", "parameter") or not name:
        raise PolicyError(
            "sticky", f"must be 'header:<name>' or 'parameter:<name>', got {doc['sticky']!r}"
        )
    # HTTP header names are case-insensitive; ASGI servers hand them over lower-cased.
    out["sticky"] = f"header:{name.lower()}" if source == "header" else doc["sticky"]


def _version(value: Any, field: str, loaded: frozenset[str] | None) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(field, f"must be a non-empty version string, got {value!r}")
    if loaded is not None and value not in loaded:
        raise PolicyError(field, f"version {value!r} is not loaded (loaded: {sorted(loaded)})")
    return value


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
