from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import (
    ACTIONS,
    Action,
    ActionConflict,
    Bandit,
    CanaryDoc,
    PolicyError,
    Shadow,
    SingleDoc,
    Split,
    parse_policy,
)

LOADED = frozenset({"1", "2", "3", "4"})
CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05}
BLUE_GREEN = {"strategy": "blue_green", "active": "1", "standby": "2"}
AB = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "sticky": "header:X-User-Id"}
BANDIT = {"strategy": "bandit", "arms": ["1", "2", "3"], "min_share": 0.05}
SINGLE = {"strategy": "single", "version": "1"}


@pytest.mark.parametrize(
    ("doc", "normalized"),
    [
        (SINGLE, SINGLE),
        (BLUE_GREEN, BLUE_GREEN),
        (
            {**CANARY, "weight": 0},
            {**CANARY, "weight": 0.0, "steps": [0.05, 0.25, 0.5, 1.0], "paused": False},
        ),
        (
            {k: v for k, v in CANARY.items() if k != "weight"} | {"steps": [0.1, 1]},
            {**CANARY, "weight": 0.1, "steps": [0.1, 1.0], "paused": False},
        ),
        (AB, {**AB, "sticky": "header:x-user-id"}),
        (
            {**AB, "arms": {"1": 1, "2": 0}},
            {**AB, "arms": {"1": 1.0, "2": 0.0}, "sticky": "header:x-user-id"},
        ),
        (BANDIT, {**BANDIT, "algorithm": "thompson"}),
        (
            {"strategy": "bandit", "arms": ["1", "2"], "algorithm": "epsilon_greedy"},
            {
                "strategy": "bandit",
                "arms": ["1", "2"],
                "algorithm": "epsilon_greedy",
                "min_share": 0.0,
                "epsilon": 0.1,
            },
        ),
        (
            {
                **SINGLE,
                "shadow": {"versions": ["3"]},
                "seed": 4,
                "guards": {"max_error_ratio": 0.02},
            },
            {
                **SINGLE,
                "shadow": {"versions": ["3"], "sample": 1.0},
                "seed": 4,
                "guards": {
                    "window_s": 60.0,
                    "min_requests": 200,
                    "interval_s": 2.0,
                    "confidence": 0.95,
                    "on_breach": "rollback",
                    "max_error_ratio": 0.02,
                },
            },
        ),
    ],
    ids=[
        "single",
        "blue_green",
        "canary",
        "canary-defaults",
        "ab",
        "ab-ints",
        "bandit",
        "eps",
        "extras",
    ],
)
def test_parse_normalizes(doc: dict[str, Any], normalized: dict[str, Any]) -> None:
    parsed = parse_policy(doc, LOADED)
    assert parsed.as_json() == normalized
    # stores hold the normalised JSON: parsing it again gives the same document
    assert parse_policy(parsed.as_json(), LOADED) == parsed


INVALID: list[tuple[str, Any, str]] = [
    ("not-object", ["single"], "policy"),
    ("no-strategy", {"version": "1"}, "strategy"),
    ("bad-strategy", {"strategy": "random"}, "strategy"),
    ("list-strategy", {"strategy": ["single"]}, "strategy"),
    ("no-version", {"strategy": "single"}, "version"),
    ("int-version", {"strategy": "single", "version": 1}, "version"),
    ("not-loaded", {"strategy": "single", "version": "9"}, "version"),
    ("unknown", {**SINGLE, "weight": 0.5}, "weight"),
    ("unknowns", {**SINGLE, "foo": 1, "bar": 2}, "foo, bar"),
    ("same-arms", {**CANARY, "candidate": "1"}, "candidate"),
    ("weight>1", {**CANARY, "weight": 1.5}, "weight"),
    ("weight-bool", {**CANARY, "weight": True}, "weight"),
    ("weight-str", {**CANARY, "weight": "0.1"}, "weight"),
    ("weight-nan", {**CANARY, "weight": math.nan}, "weight"),
    ("steps-order", {**CANARY, "steps": [0.5, 0.25]}, "steps.1"),
    ("steps-repeat", {**CANARY, "steps": [0.5, 0.5]}, "steps.1"),
    ("steps-zero", {**CANARY, "steps": [0, 0.5]}, "steps.0"),
    ("steps-big", {**CANARY, "steps": [0.5, 1.5]}, "steps.1"),
    ("steps-empty", {**CANARY, "steps": []}, "steps"),
    ("paused-str", {**CANARY, "paused": "yes"}, "paused"),
    ("sticky-source", {**CANARY, "sticky": "cookie:id"}, "sticky"),
    ("sticky-name", {**CANARY, "sticky": "header:"}, "sticky"),
    ("salt-int", {**AB, "salt": 3}, "salt"),
    ("ab-sum", {**AB, "arms": {"1": 0.5, "2": 0.4}}, "arms"),
    ("ab-one-arm", {**AB, "arms": {"1": 1.0}}, "arms"),
    ("ab-list", {**AB, "arms": ["1", "2"]}, "arms"),
    ("ab-negative", {**AB, "arms": {"1": 0.5, "2": -0.1}}, "arms.2"),
    ("ab-not-loaded", {**AB, "arms": {"1": 0.5, "9": 0.5}}, "arms.9"),
    ("bandit-dup", {**BANDIT, "arms": ["1", "1"]}, "arms"),
    ("bandit-one", {**BANDIT, "arms": ["1"]}, "arms"),
    ("bandit-not-loaded", {**BANDIT, "arms": ["1", "2", "9"]}, "arms.2"),
    ("bandit-algo", {**BANDIT, "algorithm": "softmax"}, "algorithm"),
    ("min-share", {**BANDIT, "min_share": 0.34}, "min_share"),
    ("eps-thompson", {**BANDIT, "epsilon": 0.1}, "epsilon"),
    ("eps-range", {**BANDIT, "algorithm": "epsilon_greedy", "epsilon": 2}, "epsilon"),
    ("bandit-sticky", {**BANDIT, "sticky": "header:x"}, "sticky"),
    ("bg-same", {**BLUE_GREEN, "standby": "1"}, "standby"),
    ("bg-not-loaded", {**BLUE_GREEN, "standby": "9"}, "standby"),
    ("shadow-type", {**SINGLE, "shadow": ["3"]}, "shadow"),
    ("shadow-empty", {**SINGLE, "shadow": {"versions": []}}, "shadow.versions"),
    ("shadow-primary", {**SINGLE, "shadow": {"versions": ["1"]}}, "shadow.versions.0"),
    ("shadow-standby", {**BLUE_GREEN, "shadow": {"versions": ["2"]}}, "shadow.versions.0"),
    ("shadow-loaded", {**SINGLE, "shadow": {"versions": ["3", "9"]}}, "shadow.versions.1"),
    ("shadow-dup", {**SINGLE, "shadow": {"versions": ["3", "3"]}}, "shadow.versions"),
    ("shadow-sample", {**SINGLE, "shadow": {"versions": ["3"], "sample": 1.5}}, "shadow.sample"),
    ("shadow-field", {**SINGLE, "shadow": {"versions": ["3"], "rate": 1}}, "shadow.rate"),
    ("seed-negative", {**SINGLE, "seed": -1}, "seed"),
    ("seed-float", {**SINGLE, "seed": 1.5}, "seed"),
    ("rewards-single", {**SINGLE, "reward_range": [0, 1]}, "reward_range"),
    ("rewards-shape", {**AB, "reward_range": [0, 1, 2]}, "reward_range"),
    ("rewards-order", {**AB, "reward_range": [1, 0]}, "reward_range"),
    ("rewards-empty", {**CANARY, "reward_range": [1, 1]}, "reward_range"),
    ("rewards-huge", {**AB, "reward_range": [-1e308, 1e308]}, "reward_range"),
    ("rewards-str", {**AB, "reward_range": ["0", 1]}, "reward_range.0"),
    ("rewards-nan", {**AB, "reward_range": [0, math.nan]}, "reward_range.1"),
    ("rewards-bandit", {**BANDIT, "reward_range": [0, 10]}, "reward_range"),
]


@pytest.mark.parametrize(
    ("doc", "field"), [(d, f) for _, d, f in INVALID], ids=[i for i, *_ in INVALID]
)
def test_validation_errors_name_the_field(doc: Any, field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, LOADED)
    assert not isinstance(info.value, ActionConflict)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


# Issue 14, finding 10: every list and string in a document is capped (each request routed by
# the document and each audit entry carries it). Parsed without the loaded versions, so only the
# cap can refuse these.
MANY = [str(i) for i in range(1, 34)]
STEPS_33 = [i / 33 for i in range(1, 34)]
CAPPED: list[tuple[str, Any, str]] = [
    ("steps", {**CANARY, "weight": STEPS_33[0], "steps": STEPS_33}, "steps"),
    ("ab-arms", {**AB, "arms": dict.fromkeys(MANY, 1 / 33)}, "arms"),
    ("bandit-arms", {**BANDIT, "arms": MANY}, "arms"),
    ("shadows", {**SINGLE, "version": "0", "shadow": {"versions": MANY[:17]}}, "shadow.versions"),
    ("version", {**SINGLE, "version": "v" * 65}, "version"),
    ("salt", {**AB, "salt": "s" * 257}, "salt"),
    ("sticky", {**AB, "sticky": "header:" + "h" * 250}, "sticky"),
]


@pytest.mark.parametrize(
    ("doc", "field"), [(d, f) for _, d, f in CAPPED], ids=[i for i, *_ in CAPPED]
)
def test_document_sizes_are_capped(doc: Any, field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert info.value.field == field, info.value
    assert "at most" in info.value.message


def test_documents_at_the_caps_parse() -> None:
    parse_policy({**CANARY, "weight": STEPS_33[1], "steps": STEPS_33[1:]})
    parse_policy({**BANDIT, "arms": MANY[:32], "min_share": 0.0})
    parse_policy({**SINGLE, "version": "0", "shadow": {"versions": MANY[:16]}})
    parse_policy({**AB, "arms": {"v" * 64: 0.5, "2": 0.5}, "salt": "s" * 256})


def test_reward_range_defaults_to_unit_and_a_declared_one_round_trips() -> None:
    assert parse_policy(AB, LOADED).reward_range == (0.0, 1.0)
    assert "reward_range" not in parse_policy(AB, LOADED).as_json()
    ab = parse_policy({**AB, "reward_range": [-5, 100]}, LOADED)
    assert ab.reward_range == (-5.0, 100.0) and ab.as_json()["reward_range"] == [-5.0, 100.0]
    assert parse_policy(ab.as_json(), LOADED) == ab
    # a bandit's rewards are successes of its Beta posteriors: a sub-range of [0, 1] only
    assert parse_policy({**BANDIT, "reward_range": [0, 0.5]}, LOADED).reward_range == (0.0, 0.5)


def test_unknown_field_error_lists_the_allowed_ones() -> None:
    with pytest.raises(PolicyError, match="allowed: strategy, shadow, guards, seed, version"):
        parse_policy({**SINGLE, "weight": 1}, LOADED)


PAUSED = {**CANARY, "paused": True}
CANARY_N = parse_policy(CANARY, LOADED).as_json()
KEPT = {
    "shadow": {"versions": ["4"], "sample": 0.5},
    "guards": {
        "window_s": 60.0,
        "min_requests": 200,
        "interval_s": 2.0,
        "confidence": 0.95,
        "on_breach": "rollback",
        "max_error_ratio": 0.02,
    },
    "seed": 3,
}
ACTION_CASES: list[tuple[str, dict[str, Any], Action, dict[str, Any] | str]] = [
    ("advance", CANARY, "advance", {**CANARY_N, "weight": 0.25}),
    ("advance-off-step", {**CANARY, "weight": 0.3}, "advance", {**CANARY_N, "weight": 0.5}),
    ("advance-last", {**CANARY, "weight": 1.0}, "advance", {"strategy": "single", "version": "2"}),
    ("advance-paused", PAUSED, "advance", "paused"),
    ("pause", CANARY, "pause", {**CANARY_N, "paused": True}),
    ("pause-paused", PAUSED, "pause", "paused"),
    ("resume", PAUSED, "resume", CANARY_N),
    ("resume-running", CANARY, "resume", "paused"),
    ("promote", {**CANARY, **KEPT}, "promote", {"strategy": "single", "version": "2", **KEPT}),
    ("promote-paused", PAUSED, "promote", {"strategy": "single", "version": "2"}),
    ("rollback", {**CANARY, **KEPT}, "rollback", {"strategy": "single", "version": "1", **KEPT}),
    ("rollback-paused", PAUSED, "rollback", {"strategy": "single", "version": "1"}),
    ("canary-switch", CANARY, "switch", "action"),
    (
        "switch",
        {**BLUE_GREEN, **KEPT},
        "switch",
        {**BLUE_GREEN, "active": "2", "standby": "1", **KEPT},
    ),
    *[(f"bg-{a}", BLUE_GREEN, a, "action") for a in ACTIONS if a != "switch"],
    *[(f"single-{a}", SINGLE, a, "action") for a in ACTIONS],
    *[(f"ab-{a}", AB, a, "action") for a in ACTIONS],
    *[(f"bandit-{a}", BANDIT, a, "action") for a in ACTIONS],
]


@pytest.mark.parametrize(
    ("doc", "action", "expected"), [c[1:] for c in ACTION_CASES], ids=[c[0] for c in ACTION_CASES]
)
def test_actions(doc: dict[str, Any], action: Action, expected: dict[str, Any] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ActionConflict) as info:
            parse_policy(doc).apply(action)
        assert info.value.field == expected
    else:
        result = parse_policy(doc).apply(action)
        assert result.as_json() == expected
        assert parse_policy(result.as_json(), LOADED) == result


def test_repeated_advance_walks_the_steps_then_promotes() -> None:
    doc = parse_policy(CANARY, LOADED)
    weights = []
    while isinstance(doc, CanaryDoc):
        weights.append(doc.weight)
        doc = doc.apply("advance")
    assert weights == [0.05, 0.25, 0.5, 1.0]
    assert doc == SingleDoc(version="2")


def test_unknown_action_and_invalid_doc_are_bad_requests_not_conflicts() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(CANARY).apply("explode")  # type: ignore[arg-type]
    assert not isinstance(info.value, ActionConflict) and info.value.field == "action"


def test_referenced_versions_include_standby_and_shadows() -> None:
    bg = parse_policy({**BLUE_GREEN, "shadow": {"versions": ["3"]}})
    assert bg.versions() == {"1", "2", "3"}
    assert parse_policy({**AB, "arms": {"1": 1.0, "4": 0.0}}).versions() == {"1", "4"}


def test_policy_shapes() -> None:
    assert isinstance(parse_policy(SINGLE).policy(), Split)
    canary = parse_policy({**CANARY, "sticky": "parameter:user"}).policy()
    assert isinstance(canary, Split) and canary.sticky == "parameter:user"
    assert canary.shares() == {"1": 0.95, "2": 0.05}
    bandit = parse_policy({**BANDIT, "algorithm": "epsilon_greedy", "epsilon": 0.3}).policy()
    assert isinstance(bandit, Bandit) and bandit.epsilon == 0.3 and bandit.min_share == 0.05
    shadowed = parse_policy({**AB, "shadow": {"versions": ["3"], "sample": 0.5}}).policy()
    assert isinstance(shadowed, Shadow) and shadowed.sample == 0.5
    assert shadowed.versions() == {"1", "2", "3"}


def test_seed_makes_random_assignment_reproducible() -> None:
    doc = {**BANDIT, "seed": 11, "shadow": {"versions": ["4"], "sample": 0.5}}
    policies = [parse_policy(doc).policy(), parse_policy(doc).policy()]
    runs = [[p.choose(None) for _ in range(200)] for p in policies]
    assert runs[0] == runs[1]
    assert len({d.version for d in runs[0]}) == 3 and len({d.shadows for d in runs[0]}) == 2


# Documents one or two edits away from valid ones: both the error paths and valid variants.
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-1, 2)
    | st.floats(-0.5, 1.5)
    | st.sampled_from(["1", "2", "3", "4", "x", "", "header:u", "ucb1"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["1", "2", "3", "versions", "sample"]), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELD_NAMES = ["version", "active", "standby", "baseline", "candidate", "weight", "steps"]
FIELD_NAMES += ["paused", "sticky", "salt", "arms", "algorithm", "min_share", "epsilon", "shadow"]
BASES = [SINGLE, CANARY, BLUE_GREEN, AB, BANDIT, {**AB, "shadow": {"versions": ["3"]}}]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    base=st.sampled_from(BASES),
    edits=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON, max_size=2),
    drop=st.sampled_from([None, *FIELD_NAMES]),
)
def test_any_document_is_either_a_policy_error_or_a_working_policy(
    base: dict[str, Any], edits: dict[str, Any], drop: str | None
) -> None:
    doc = {k: v for k, v in {**base, **edits}.items() if k != drop}
    try:
        parsed = parse_policy(doc, LOADED)
    except PolicyError:
        return
    policy = parsed.policy()
    assert policy.choose("key").version in policy.versions()
    assert math.isclose(sum(policy.shares().values()), 1.0)
    assert parse_policy(parsed.as_json(), LOADED) == parsed
    for action in ACTIONS:
        with contextlib.suppress(ActionConflict):
            after = parsed.apply(action)
            assert parse_policy(after.as_json(), LOADED) == after
