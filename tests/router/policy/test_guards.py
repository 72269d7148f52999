"""router.policy.guards: the guards object, the bounds (against scipy), verdicts and plans."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from monitors import LatencyHistogram
from router.policy.guard_spec import GuardSpec
from router.policy.guards import (
    Check,
    ColumnPsi,
    Evaluation,
    Figures,
    ShadowWindow,
    VersionWindow,
    at_rank,
    evaluate,
    p99_bounds,
    plan,
    quantile_ranks,
    ratio_lower_bound,
)
from router.policy.policies import PolicyError
from router.policy.spec import PolicyDoc, SingleDoc, parse_policy

LOADED = ["1", "2", "3", "4"]
CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "steps": [0.1, 0.5, 1.0]}
DEFAULTS = {
    "window_s": 60.0,
    "min_requests": 200,
    "interval_s": 2.0,
    "confidence": 0.95,
    "on_breach": "rollback",
}
CONTRACT = {
    "window_s": 60,
    "min_requests": 200,
    "max_error_ratio": 0.01,
    "max_p99_ratio_to_baseline": 1.5,
    "max_psi": 0.25,
    "max_shadow_disagreement": 0.05,
    "on_breach": "rollback",
    "advance_after_s": 300,
}


class Sample:
    """Exact latencies behind the Latencies protocol (numpy's nearest rank)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    @property
    def count(self) -> int:
        return int(self.values.size)

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.values, q, method="inverted_cdf"))


# -- the guards object --------------------------------------------------------------------------
def test_the_contract_fields_parse_and_normalise_idempotently() -> None:
    parsed = normalised(CONTRACT)
    assert parsed == {
        **DEFAULTS,
        "advance_after_s": 300.0,
        "max_error_ratio": 0.01,
        "max_p99_ratio_to_baseline": 1.5,
        "max_psi": 0.25,
        "max_shadow_disagreement": 0.05,
    }
    assert normalised(parsed) == parsed
    assert normalised({}) == DEFAULTS


def test_policies_validate_their_guards_and_actions_keep_them() -> None:
    doc = parse_policy({**CANARY, "guards": {"max_error_ratio": 0.02}}, LOADED)
    assert doc.as_json()["guards"] == {**DEFAULTS, "max_error_ratio": 0.02}
    assert doc.apply("rollback").guards == doc.guards
    with pytest.raises(PolicyError) as info:
        parse_policy({**CANARY, "guards": {"max_error_ratio": 2}}, LOADED)
    assert info.value.field == "guards.max_error_ratio"


def normalised(raw: Any) -> dict[str, Any]:
    return GuardSpec.parse(raw).as_doc()


INVALID: list[tuple[str, Any, str]] = [
    ("not-object", [1], "guards"),
    ("unknown", {"max_errors": 1}, "guards.max_errors"),
    ("window-zero", {"window_s": 0}, "guards.window_s"),
    ("window-string", {"window_s": "60"}, "guards.window_s"),
    ("window-nan", {"window_s": math.nan}, "guards.window_s"),
    ("min-requests-float", {"min_requests": 2.5}, "guards.min_requests"),
    ("min-requests-bool", {"min_requests": True}, "guards.min_requests"),
    ("min-requests-zero", {"min_requests": 0}, "guards.min_requests"),
    ("interval-small", {"interval_s": 0.1}, "guards.interval_s"),
    ("confidence-one", {"confidence": 1.0}, "guards.confidence"),
    ("confidence-low", {"confidence": 0.3}, "guards.confidence"),
    ("error-ratio-one", {"max_error_ratio": 1.0}, "guards.max_error_ratio"),
    ("error-ratio-negative", {"max_error_ratio": -0.1}, "guards.max_error_ratio"),
    ("p99-ratio-zero", {"max_p99_ratio_to_baseline": 0}, "guards.max_p99_ratio_to_baseline"),
    ("p99-s-negative", {"max_p99_s": -1}, "guards.max_p99_s"),
    ("p99-s-inf", {"max_p99_s": math.inf}, "guards.max_p99_s"),
    ("psi-zero", {"max_psi": 0}, "guards.max_psi"),
    ("prediction-psi-null", {"max_prediction_psi": None}, "guards.max_prediction_psi"),
    ("shadow-ratio", {"max_shadow_disagreement": 1.5}, "guards.max_shadow_disagreement"),
    ("on-breach", {"on_breach": "panic"}, "guards.on_breach"),
    ("advance-negative", {"advance_after_s": -1}, "guards.advance_after_s"),
]


@pytest.mark.parametrize(("raw", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_guards_name_the_field(raw: Any, field: str) -> None:
    with pytest.raises(PolicyError) as info:
        normalised(raw)
    assert info.value.field == field


# -- statistics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 300), (30, 300), (299, 300), (7, 7)])
def test_ratio_lower_bound_is_clopper_pearson(k: int, n: int, confidence: float) -> None:
    bound = ratio_lower_bound(k, n, confidence)
    exact = stats.binomtest(k, n, alternative="greater").proportion_ci(confidence, "exact").low
    assert bound == pytest.approx(exact, rel=1e-9, abs=1e-12)
    if k:
        assert bound == pytest.approx(stats.beta.ppf(1 - confidence, k, n - k + 1), rel=1e-9)


@pytest.mark.parametrize(("p", "n"), [(0.01, 200), (0.01, 2000), (0.05, 60), (0.3, 500)])
def test_the_error_bound_exceeds_the_true_ratio_at_most_one_minus_confidence(
    p: float, n: int
) -> None:
    # exact: sum the binomial probabilities of every count whose bound lies above p
    k = np.arange(n + 1)
    above = np.array([ratio_lower_bound(int(i), n, 0.95) > p for i in k])
    assert float(stats.binom.pmf(k[above], n, p).sum()) <= 0.05


@pytest.mark.parametrize("confidence", [0.9, 0.95])
@pytest.mark.parametrize("n", [1, 20, 100, 298, 299, 1000, 5000])
def test_quantile_ranks_are_the_extreme_valid_order_statistics(n: int, confidence: float) -> None:
    q = 0.99
    lo, hi = quantile_ranks(n, q, confidence)
    if lo >= 1:  # P(X(lo) <= xi) = P(Binomial(n, q) >= lo)
        assert stats.binom.sf(lo - 1, n, q) >= confidence
    if lo < n:
        assert stats.binom.sf(lo, n, q) < confidence  # lo + 1 would not be valid
    if hi <= n:  # P(X(hi) >= xi) = P(Binomial(n, q) <= hi - 1)
        assert stats.binom.cdf(hi - 1, n, q) >= confidence
    if hi >= 2:
        assert stats.binom.cdf(hi - 2, n, q) < confidence  # hi - 1 would not be valid
    assert 0 <= lo <= hi <= n + 1


def test_at_rank_is_the_order_statistic_and_the_histogram_agrees_within_alpha() -> None:
    rng = np.random.default_rng(11)
    x = rng.lognormal(-5, 1, 997)
    exact = np.sort(x)
    sample = Sample(x)
    histogram = LatencyHistogram()
    histogram.record(x)
    for rank in (1, 2, 500, 996, 997):
        assert at_rank(sample, rank) == exact[rank - 1]
        assert at_rank(histogram, rank) == pytest.approx(exact[rank - 1], rel=0.0101)


def test_p99_bounds_cover_the_true_p99_as_often_as_promised() -> None:
    # 2000 samples of 300 from a known distribution; a one-sided 95 % bound misses the true p99
    # at most 5 % of the time, and the count of misses is Binomial(2000, <= 0.05): 0.05 plus
    # 4.5 standard deviations (0.022) bounds it except with probability < 1e-5.
    rng = np.random.default_rng(5)
    true_p99 = float(stats.lognorm.ppf(0.99, 1.0, scale=math.exp(-5)))
    trials = 2000
    low_misses = high_misses = 0
    for _ in range(trials):
        lower, upper = p99_bounds(Sample(rng.lognormal(-5, 1, 300)), 0.95)
        assert lower is not None and upper is not None
        low_misses += lower > true_p99
        high_misses += upper < true_p99
    limit = 0.05 + 4.5 * math.sqrt(0.05 * 0.95 / trials)
    assert low_misses / trials <= limit
    assert high_misses / trials <= limit


# -- verdicts -----------------------------------------------------------------------------------
def window(
    requests: int = 1000,
    errors: int = 0,
    latency_s: float | None = 0.01,
    features: tuple[ColumnPsi, ...] = (),
) -> VersionWindow:
    latency = None
    if latency_s is not None:
        # a fixed spread: 1.0..1.2 x latency_s
        latency = Sample(latency_s * np.linspace(1.0, 1.2, requests - errors))
    return VersionWindow(requests, errors, latency, features)


def spec(**kw: Any) -> GuardSpec:
    return GuardSpec.parse({"min_requests": 100, **kw})


def statuses(evaluation: Evaluation) -> dict[tuple[str, str], str]:
    return {(c.guard, c.version): c.status for c in evaluation.checks}


DRIFTED = ColumnPsi("f0", 0.4, 0.05, True)
NOISY = ColumnPsi("f1", 0.4, 0.6, True)  # large PSI, but within sampling noise
CALM = ColumnPsi("f2", 0.01, 0.05, True)
THIN = ColumnPsi("f3", 0.9, 0.05, False)

VERDICTS: list[tuple[str, dict[str, Any], dict[str, VersionWindow], str, dict[Any, str]]] = [
    ("too-few", {"max_error_ratio": 0.01}, {"1": window(), "2": window(99, 99)}, "insufficient",
     {("min_requests", "2"): "insufficient"}),
    ("errors", {"max_error_ratio": 0.01}, {"1": window(), "2": window(300, 30)}, "breach",
     {("max_error_ratio", "2"): "breach"}),
    # 5 errors in 300 is a raw 1.7 %, but its 95 % lower bound (0.65 %) is under 1 %
    ("few-errors", {"max_error_ratio": 0.01}, {"1": window(), "2": window(300, 5)}, "pass",
     {("max_error_ratio", "2"): "pass"}),
    ("baseline-errors-ignored", {"max_error_ratio": 0.01}, {"1": window(1000, 900), "2": window()},
     "pass", {("max_error_ratio", "2"): "pass"}),
    ("slow", {"max_p99_ratio_to_baseline": 1.5}, {"1": window(), "2": window(latency_s=0.03)},
     "breach", {("max_p99_ratio_to_baseline", "2"): "breach"}),
    ("as-fast", {"max_p99_ratio_to_baseline": 1.5}, {"1": window(), "2": window()}, "pass",
     {("max_p99_ratio_to_baseline", "2"): "pass"}),
    ("no-baseline", {"max_p99_ratio_to_baseline": 1.5},
     {"1": window(100), "2": window(latency_s=0.03)}, "pass",
     {("max_p99_ratio_to_baseline", "2"): "skipped"}),
    ("absolute-p99", {"max_p99_s": 0.02}, {"1": window(), "2": window(latency_s=0.03)}, "breach",
     {("max_p99_s", "2"): "breach"}),
    ("all-failed", {"max_p99_s": 0.02}, {"1": window(), "2": window(200, 200)}, "pass",
     {("max_p99_s", "2"): "skipped"}),
    ("drift", {"max_psi": 0.25}, {"1": window(), "2": window(features=(CALM, DRIFTED))},
     "breach", {("max_psi", "2"): "breach"}),
    ("noise", {"max_psi": 0.25}, {"1": window(), "2": window(features=(CALM, NOISY))}, "pass",
     {("max_psi", "2"): "pass"}),
    ("drift-thin", {"max_psi": 0.25}, {"1": window(), "2": window(features=(THIN,))},
     "insufficient", {("max_psi", "2"): "insufficient"}),
    ("no-reference", {"max_psi": 0.25}, {"1": window(), "2": window()}, "pass",
     {("max_psi", "2"): "skipped"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("guards", "versions", "verdict", "expected"),
    [c[1:] for c in VERDICTS],
    ids=[c[0] for c in VERDICTS],
)
def test_canary_verdicts(
    guards: dict[str, Any],
    versions: dict[str, VersionWindow],
    verdict: str,
    expected: dict[Any, str],
) -> None:
    evaluation = evaluate(spec(**guards), parse_policy(CANARY, LOADED), Figures(versions))
    assert evaluation.verdict == verdict
    assert statuses(evaluation) == expected


def test_shadow_checks_breach_but_never_hold_the_verdict_back() -> None:
    doc = parse_policy({**CANARY, "shadow": {"versions": ["3", "4"]}}, LOADED)
    shadows = {"3": ShadowWindow(500, 500, 100), "4": ShadowWindow(10, 10, 10)}
    figures = Figures({"1": window(), "2": window()}, shadows)
    evaluation = evaluate(spec(max_shadow_disagreement=0.05), doc, figures)
    assert statuses(evaluation) == {
        ("max_shadow_disagreement", "3"): "breach",
        ("max_shadow_disagreement", "4"): "insufficient",
    }
    assert evaluation.verdict == "breach"
    figures = Figures({"1": window(), "2": window()}, {"3": ShadowWindow(500, 500, 5)})
    assert evaluate(spec(max_shadow_disagreement=0.05), doc, figures).verdict == "pass"


SUBJECTS = [
    ("single", {"strategy": "single", "version": "1"}, [("1", None)]),
    ("canary", CANARY, [("2", "1")]),
    ("blue_green", {"strategy": "blue_green", "active": "2", "standby": "1"}, [("2", None)]),
    ("ab", {"strategy": "ab", "arms": {"1": 0.0, "2": 0.5, "3": 0.5}}, [("2", None), ("3", "2")]),
    ("bandit", {"strategy": "bandit", "arms": ["3", "1"]}, [("3", None), ("1", "3")]),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [c[1:] for c in SUBJECTS], ids=[c[0] for c in SUBJECTS]
)
def test_subjects_per_strategy(doc: dict[str, Any], expected: list[Any]) -> None:
    found = parse_policy(doc, LOADED).subjects()
    assert [(s.version, s.baseline) for s in found] == expected


# -- plans --------------------------------------------------------------------------------------
def breach(*versions: str, guard: str = "max_error_ratio") -> Evaluation:
    return Evaluation("breach", tuple(Check(guard, v, "breach", 0.5, 0.01) for v in versions))


PASS = Evaluation("pass", ())
BG = {"strategy": "blue_green", "active": "2", "standby": "1"}
AB = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.3, "3": 0.2}}
BANDIT = {"strategy": "bandit", "arms": ["1", "2", "3"], "min_share": 0.1}
SINGLE_2 = {"strategy": "single", "version": "2"}
GUARDS = {"guards": {"max_error_ratio": 0.01}}

PLANS: list[tuple[str, dict[str, Any], Evaluation, str | None, dict[str, Any] | None]] = [
    ("canary-rollback", CANARY, breach("2"), "rollback", {"strategy": "single", "version": "1"}),
    ("switch-back", BG, breach("2"), "switch", {**BG, "active": "1", "standby": "2"}),
    ("ab-drop", AB, breach("2"), "drop_arm",
     {**AB, "arms": {"1": 0.5 / 0.7, "2": 0.0, "3": 0.2 / 0.7}}),
    ("ab-drop-two", AB, breach("1", "3"), "drop_arm",
     {**AB, "arms": {"1": 0.0, "2": 1.0, "3": 0.0}}),
    ("ab-all-bad", AB, breach("1", "2", "3"), None, None),
    ("bandit-drop", BANDIT, breach("1"), "drop_arm", {**BANDIT, "arms": ["2", "3"]}),
    ("bandit-to-single", BANDIT, breach("1", "3"), "drop_arm", SINGLE_2),
    ("bandit-all-bad", BANDIT, breach("1", "2", "3"), None, None),
    ("single", {"strategy": "single", "version": "1"}, breach("1"), None, None),
    ("canary-insufficient", CANARY, Evaluation("insufficient", ()), None, None),
    ("canary-shadow", {**CANARY, "shadow": {"versions": ["3", "4"]}},
     breach("3", guard="max_shadow_disagreement"), "drop_shadow",
     {**CANARY, "shadow": {"versions": ["4"], "sample": 1.0}}),
    ("last-shadow", {**CANARY, "shadow": {"versions": ["3"]}},
     breach("3", guard="max_shadow_disagreement"), "drop_shadow", CANARY),
]  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "evaluation", "action", "after"), [c[1:] for c in PLANS], ids=[c[0] for c in PLANS]
)
def test_the_action_a_breach_leads_to(
    doc: dict[str, Any], evaluation: Evaluation, action: str | None, after: dict[str, Any] | None
) -> None:
    parsed = parse_policy({**doc, **GUARDS}, LOADED)
    change = plan(parsed, guards_of(parsed), evaluation)
    if action is None:
        assert change is None
        return
    assert change is not None
    assert change.action == action
    assert change.guard == evaluation.checks[0].guard
    assert after is not None
    assert change.doc == parse_policy({**after, **GUARDS}, LOADED)
    assert parse_policy(change.doc.as_json(), LOADED) == change.doc  # a valid document
    assert "version" in change.reason


def test_alert_only_guards_change_nothing() -> None:
    parsed = parse_policy({**CANARY, "guards": {"on_breach": "alert"}}, LOADED)
    assert plan(parsed, guards_of(parsed), breach("2")) is None


def test_blue_green_switches_back_once_not_back_and_forth() -> None:
    parsed = parse_policy({**BG, **GUARDS}, LOADED)
    assert plan(parsed, guards_of(parsed), breach("2"), last_change_by_guard=True) is None


@pytest.mark.parametrize(
    ("weight", "paused", "healthy_for_s", "action", "after"),
    [
        (0.1, False, 9.9, None, None),
        (0.1, False, 10.0, "advance", 0.5),
        (0.5, False, 60.0, "advance", 1.0),
        (1.0, False, 10.0, "promote", None),
        (0.1, True, 60.0, None, None),
    ],
    ids=["not-yet", "advance", "advance-again", "promote", "paused"],
)
def test_a_canary_healthy_for_advance_after_s_advances_then_promotes(
    weight: float, paused: bool, healthy_for_s: float, action: str | None, after: float | None
) -> None:
    guards = {"guards": {"advance_after_s": 10}}
    doc = parse_policy({**CANARY, "weight": weight, "paused": paused, **guards}, LOADED)
    change = plan(doc, guards_of(doc), PASS, healthy_for_s=healthy_for_s)
    if action is None:
        assert change is None
        return
    assert change is not None and change.action == action
    assert change.guard == "advance_after_s"
    if action == "promote":
        assert change.doc == SingleDoc(version="2", guards=doc.guards)
    else:
        assert change.doc.as_json()["weight"] == after


def guards_of(doc: PolicyDoc) -> GuardSpec:
    assert doc.guards is not None
    return doc.guards


def test_without_advance_after_s_a_healthy_canary_stays_put() -> None:
    doc = parse_policy({**CANARY, **GUARDS}, LOADED)
    assert plan(doc, guards_of(doc), PASS, healthy_for_s=1e9) is None
