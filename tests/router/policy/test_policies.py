from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from router import Arm, Decision, Policy, Shadow, Split, parse_policy, sticky_key

# Every share below is a proportion over n independent draws (or keys, whose hashes behave as
# independent uniforms), so its sd is sqrt(p(1-p)/n); allowing 4.5 sd makes a false failure a
# 7e-6 event per check while a real bias of a few sd still fails. Seeds make runs repeatable.
Z = 4.5
N = 20_000
KEYS = [f"user-{i}" for i in range(N)]


def within(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= Z * math.sqrt(p * (1 - p) / n) + 1e-12


def shares(policy: Policy, keys: list[str | None]) -> dict[str, float]:
    counts = Counter(policy.choose(k).version for k in keys)
    return {v: c / len(keys) for v, c in counts.items()}


DOCS: list[tuple[str, dict[str, Any], dict[str, float]]] = [
    ("single", {"strategy": "single", "version": "1"}, {"1": 1.0}),
    ("blue_green", {"strategy": "blue_green", "active": "2", "standby": "1"}, {"2": 1.0}),
    (
        "canary",
        {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05},
        {"1": 0.95, "2": 0.05},
    ),
    ("ab", {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}, {"1": 0.5, "2": 0.5}),
    (
        "ab3",
        {"strategy": "ab", "arms": {"a": 0.2, "b": 0.3, "c": 0.5}},
        {"a": 0.2, "b": 0.3, "c": 0.5},
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [(d, e) for _, d, e in DOCS], ids=[i for i, *_ in DOCS]
)
@pytest.mark.parametrize("keyed", [False, True], ids=["random", "hashed"])
def test_split_shares_match_weights(
    doc: dict[str, Any], expected: dict[str, float], keyed: bool
) -> None:
    policy = parse_policy({**doc, "seed": 7}).policy(salt="model")
    observed = shares(policy, list(KEYS) if keyed else [None] * N)
    assert set(observed) == set(expected)
    for version, p in expected.items():
        assert within(observed[version], p, N), (version, observed[version], p)
    assert {v: s for v, s in policy.shares().items() if s > 0} == pytest.approx(expected)


def test_decision_carries_propensity_and_role() -> None:
    doc = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25}
    policy = parse_policy(doc).policy()
    decisions = {policy.choose(k) for k in KEYS[:500]}
    assert decisions == {
        Decision("1", propensity=0.75, arm_role="baseline"),
        Decision("2", propensity=0.25, arm_role="candidate"),
    }
    bg = parse_policy({"strategy": "blue_green", "active": "1", "standby": "2"}).policy()
    assert bg.choose(None) == Decision("1", propensity=1.0, arm_role="active")
    assert bg.versions() == frozenset({"1"})  # the standby gets no traffic
    assert bg.shares() == {"1": 1.0, "2": 0.0}


def test_same_key_same_version_on_every_replica() -> None:
    doc = {"strategy": "ab", "arms": {"1": 0.3, "2": 0.3, "3": 0.4}, "sticky": "header:x-user-id"}
    # Fresh objects with different random generators stand for replicas and restarts.
    replicas = [parse_policy({**doc, "seed": s}).policy(salt="model") for s in range(3)]
    for key in KEYS[:5000]:
        assert len({r.choose(key).version for r in replicas}) == 1


def test_models_are_salted_independently() -> None:
    doc = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}
    a, b = parse_policy(doc).policy(salt="model-a"), parse_policy(doc).policy(salt="model-b")
    agree = sum(a.choose(k).version == b.choose(k).version for k in KEYS) / N
    assert within(agree, 0.5, N)  # independent 50/50 assignments agree half the time
    c = parse_policy({**doc, "salt": "experiment-2"}).policy(salt="model-a")
    agree = sum(a.choose(k).version == c.choose(k).version for k in KEYS) / N
    assert within(agree, 0.5, N)


def test_canary_ramp_keeps_candidate_users_on_the_candidate() -> None:
    steps = [0.01, 0.05, 0.25, 0.5, 0.75, 1.0]
    on_candidate: set[str] = set()
    for w in steps:
        doc = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": w}
        policy = parse_policy({**doc, "sticky": "header:x-user-id"}).policy(salt="model")
        now = {k for k in KEYS if policy.choose(k).version == "2"}
        assert on_candidate <= now, f"{len(on_candidate - now)} users flipped back at {w}"
        assert within(len(now) / N, w, N)
        on_candidate = now


def moved_fraction(old: Policy, new: Policy) -> float:
    return sum(old.choose(k).version != new.choose(k).version for k in KEYS) / N


def modulo_assign(key: str, weights: dict[str, float]) -> str:
    """The naive scheme: a slot table with weights in percent, slot = hash(key) mod its size."""
    percents = {v: round(w * 100) for v, w in weights.items()}
    g = math.gcd(*percents.values())
    table = [v for v, p in percents.items() for _ in range(p // g)]
    digest = int.from_bytes(random.Random(key).randbytes(8), "big")  # stable per key
    return table[digest % len(table)]


# (old, new) weights where one arm changes against the others (kept in ratio): rendezvous
# hashing then moves exactly the total-variation distance, the least any assignment can.
CHANGES = [
    ({"1": 0.5, "2": 0.5}, {"1": 0.7, "2": 0.3}),
    ({"1": 0.5, "2": 0.3, "3": 0.2}, {"1": 0.25, "2": 0.45, "3": 0.3}),
    ({"1": 0.5, "2": 0.5}, {"1": 0.4, "2": 0.4, "3": 0.2}),
    ({"1": 0.4, "2": 0.4, "3": 0.2}, {"1": 0.5, "2": 0.5}),
]


@pytest.mark.parametrize(("old", "new"), CHANGES, ids=["2arms", "shrink", "add", "remove"])
def test_weight_change_moves_only_the_keys_that_must_move(
    old: dict[str, float], new: dict[str, float]
) -> None:
    tv = 0.5 * sum(abs(old.get(v, 0.0) - new.get(v, 0.0)) for v in old.keys() | new.keys())
    before = parse_policy({"strategy": "ab", "arms": old}).policy(salt="m")
    after = parse_policy({"strategy": "ab", "arms": new}).policy(salt="m")
    moved = moved_fraction(before, after)
    assert within(moved, tv, N), (moved, tv)
    naive = sum(modulo_assign(k, old) != modulo_assign(k, new) for k in KEYS) / N
    assert naive > tv + Z * math.sqrt(tv * (1 - tv) / N), (naive, tv)


def test_general_change_moves_like_an_exponential_race() -> None:
    # Shifting weight among several arms at once can move more than the TV distance: the
    # expected amount is that of independent Exp(1) races, which a numpy simulation gives.
    old, new = {"1": 0.2, "2": 0.3, "3": 0.5}, {"1": 0.3, "2": 0.3, "3": 0.4}
    moved = moved_fraction(
        parse_policy({"strategy": "ab", "arms": old}).policy(),
        parse_policy({"strategy": "ab", "arms": new}).policy(),
    )
    e = np.random.default_rng(3).exponential(size=(200_000, 3))
    w_old, w_new = np.array(list(old.values())), np.array(list(new.values()))
    reference = float(np.mean(np.argmin(e / w_old, axis=1) != np.argmin(e / w_new, axis=1)))
    sd = math.sqrt(reference * (1 - reference) * (1 / N + 1 / 200_000))
    assert abs(moved - reference) <= Z * sd
    assert moved >= 0.1  # the TV distance


@pytest.mark.parametrize("sample", [0.0, 0.3, 1.0])
def test_shadow_copies_the_sampled_fraction(sample: float) -> None:
    primary = Split((Arm("1", 0.5), Arm("2", 0.5)), rng=random.Random(1))
    policy = Shadow(primary, ("3", "4"), sample, random.Random(2))
    decisions = [policy.choose(None) for _ in range(N)]
    shadowed = [d for d in decisions if d.shadows]
    assert all(d.shadows == ("3", "4") for d in shadowed)
    assert within(len(shadowed) / N, sample, N)
    assert policy.versions() == frozenset({"1", "2", "3", "4"})
    assert policy.shares() == {"1": 0.5, "2": 0.5}
    assert {d.version for d in decisions} == {"1", "2"}
    assert {d.propensity for d in decisions} == {0.5}


def test_shadow_keeps_the_primary_stickiness() -> None:
    doc = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "sticky": "parameter:user"}
    plain = parse_policy(doc).policy(salt="m")
    shadowed = parse_policy({**doc, "shadow": {"versions": ["3"]}}).policy(salt="m")
    assert shadowed.sticky == "parameter:user"
    assert all(plain.choose(k).version == shadowed.choose(k).version for k in KEYS[:2000])


@pytest.mark.parametrize(
    ("spec", "headers", "parameters", "expected"),
    [
        (None, {"x-user-id": "u1"}, {}, None),
        ("header:x-user-id", {"x-user-id": "u1"}, {}, "u1"),
        ("header:x-user-id", {"X-User-Id": "u1"}, {}, "u1"),
        ("header:x-user-id", {"x-user-id": ""}, {}, None),
        ("header:x-user-id", {}, {"x-user-id": "u1"}, None),
        ("parameter:user", {}, {"user": "u1"}, "u1"),
        ("parameter:user", {}, {"user": 42}, "42"),
        ("parameter:user", {}, {"user": True}, None),
        ("parameter:user", {}, {"user": 4.2}, None),
        ("parameter:user", {"user": "u1"}, {}, None),
    ],
    ids=[
        "no-sticky",
        "header",
        "header-case",
        "header-empty",
        "header-missing",
        "param-str",
        "param-int",
        "param-bool",
        "param-float",
        "param-missing",
    ],
)
def test_sticky_key(
    spec: str | None, headers: dict[str, str], parameters: dict[str, Any], expected: str | None
) -> None:
    assert sticky_key(spec, headers, parameters) == expected


def test_sticky_key_of_the_principal() -> None:
    assert sticky_key("principal", {"x": "y"}, {"user": "u1"}, "alpha") == "alpha"
    assert sticky_key("principal", {}, {}, None) is None


def test_sticky_key_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="sticky"):
        sticky_key("cookie:id", {}, {})


@pytest.mark.parametrize(
    "arms",
    [(Arm("1", 0.5), Arm("1", 0.5)), (Arm("1", -0.1), Arm("2", 1.1)), (Arm("1", 0.0),)],
    ids=["duplicate", "negative", "all-zero"],
)
def test_split_rejects_bad_arms(arms: tuple[Arm, ...]) -> None:
    with pytest.raises(ValueError, match="arm"):
        Split(arms)
