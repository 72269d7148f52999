"""Quality guards in router.policy: ``min_quality``, ``max_quality_drop_vs_baseline`` and
``min_labels`` validated with the field named, judged on confidence bounds in the metric's own
direction, no verdict before ``min_labels``, and a breach that rolls back with its condition
named (``guard:min_quality.recall``)."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from monitors.quality import (
    BINARY_FIGURES,
    MULTICLASS_FIGURES,
    REGRESSION_FIGURES,
    BinaryQuality,
    Figure,
    drop_bound,
    wilson,
)
from router.policy.guard_spec import QUALITY_METRICS, GuardSpec
from router.policy.guards import (
    Figures,
    QualityFigure,
    QualityWindow,
    VersionWindow,
    evaluate,
    plan,
)
from router.policy.policies import PolicyError
from router.policy.spec import CanaryDoc, SingleDoc, parse_policy

CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.1}
QUALITY = {
    "min_requests": 1,
    "min_labels": 50,
    "min_quality": {"recall": 0.7, "log_loss": 0.6},
    "max_quality_drop_vs_baseline": {"accuracy": 0.05},
}
TRAFFIC = {"1": VersionWindow(requests=1000), "2": VersionWindow(requests=100)}


def canary(guards: dict[str, Any]) -> CanaryDoc:
    doc = parse_policy({**CANARY, "guards": guards}, ["1", "2"])
    assert isinstance(doc, CanaryDoc)
    return doc


def test_the_metrics_are_the_quality_figures_with_a_direction() -> None:
    figures = set(BINARY_FIGURES) | set(REGRESSION_FIGURES) | set(MULTICLASS_FIGURES)
    counts_and_bias = {"tp", "fp", "tn", "fn", "bias"}
    assert set(QUALITY_METRICS) == figures - counts_and_bias
    # the direction is the accumulators' own (monitors.quality.Figure.higher_is_better)
    from monitors.quality import BinaryQuality, RegressionQuality

    realized: dict[str, Figure] = {**BinaryQuality().realized(), **RegressionQuality().realized()}
    for metric, figure in realized.items():
        if metric in QUALITY_METRICS:
            assert figure.higher_is_better is QUALITY_METRICS[metric], metric


def test_quality_guards_parse_and_normalise() -> None:
    spec = GuardSpec.parse(QUALITY)
    assert spec.min_quality == (("log_loss", 0.6), ("recall", 0.7))
    assert spec.max_quality_drop_vs_baseline == (("accuracy", 0.05),)
    assert spec.min_labels == 50 and spec.judges_quality
    assert GuardSpec.parse(spec.as_doc()) == spec
    assert spec.as_doc()["min_quality"] == {"log_loss": 0.6, "recall": 0.7}
    assert spec.thresholds() == {
        "min_quality.log_loss": 0.6,
        "min_quality.recall": 0.7,
        "max_quality_drop_vs_baseline.accuracy": 0.05,
    }
    plain = GuardSpec.parse({"max_error_ratio": 0.01})
    assert not plain.judges_quality and "min_labels" not in plain.as_doc()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"min_quality": {"recal": 0.7}}, "guards.min_quality.recal"),
        ({"min_quality": {"bias": 0.1}}, "guards.min_quality.bias"),
        ({"min_quality": {"tp": 10}}, "guards.min_quality.tp"),
        ({"min_quality": {"recall": 1.5}}, "guards.min_quality.recall"),
        ({"min_quality": {"recall": -0.1}}, "guards.min_quality.recall"),
        ({"min_quality": {"recall": "0.7"}}, "guards.min_quality.recall"),
        ({"min_quality": {"recall": True}}, "guards.min_quality.recall"),
        ({"min_quality": {"mae": 1e16}}, "guards.min_quality.mae"),
        ({"min_quality": {"x" * 5000: 0.5}}, "guards.min_quality." + "x" * 40),
        ({"min_quality": {}}, "guards.min_quality"),
        ({"min_quality": [["recall", 0.7]]}, "guards.min_quality"),
        ({"min_quality": 0.7}, "guards.min_quality"),
        ({"max_quality_drop_vs_baseline": {"roc_auc": 2}},
         "guards.max_quality_drop_vs_baseline.roc_auc"),
        ({"max_quality_drop_vs_baseline": None}, "guards.max_quality_drop_vs_baseline"),
        ({"min_labels": 0}, "guards.min_labels"),
        ({"min_labels": 10**10}, "guards.min_labels"),
        ({"min_labels": 5.5}, "guards.min_labels"),
        ({"min_labels": "100"}, "guards.min_labels"),
    ],
)  # fmt: skip
def test_invalid_quality_guards_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        GuardSpec.parse(raw)
    assert caught.value.field == field
    assert len(str(caught.value)) < 400  # a hostile key is not echoed whole


def figure(value: float, low: float, high: float, n: int = 200) -> QualityFigure:
    return QualityFigure(value, low, high, n)


def judge(spec: GuardSpec, candidate: QualityWindow) -> Any:
    doc = canary({"min_requests": 1})
    return evaluate(spec, doc, Figures(TRAFFIC, quality={"2": candidate}))


def test_min_quality_is_judged_on_the_bound_in_the_metric_direction() -> None:
    spec = GuardSpec.parse({"min_requests": 1, "min_labels": 50,
                            "min_quality": {"recall": 0.7, "log_loss": 0.6}})  # fmt: skip
    loss = figure(0.4, 0.3, 0.5)
    good = QualityWindow(200, {"recall": figure(0.85, 0.75, 0.92), "log_loss": loss})
    evaluation = judge(spec, good)
    assert evaluation.verdict == "pass"
    checks = {c.guard: c for c in evaluation.checks}
    assert checks["min_quality.recall"].value == 0.75  # the lower bound
    assert checks["min_quality.log_loss"].value == 0.5  # the upper bound: lower is better
    # the point value is above the floor but its lower bound is not: not shown good enough
    unsure = QualityWindow(200, {"recall": figure(0.74, 0.65, 0.82), "log_loss": loss})
    evaluation = judge(spec, unsure)
    assert evaluation.verdict == "breach"
    assert [c.guard for c in evaluation.breaches] == ["min_quality.recall"]
    described = evaluation.breaches[0].describe()
    assert "min_quality.recall breach for version 2: 0.65 < 0.7" in described
    lossy_loss = figure(0.5, 0.4, 0.65)
    lossy = QualityWindow(200, {"recall": figure(0.85, 0.75, 0.92), "log_loss": lossy_loss})
    assert [c.guard for c in judge(spec, lossy).breaches] == ["min_quality.log_loss"]


def test_no_verdict_before_min_labels() -> None:
    spec = GuardSpec.parse({"min_requests": 1, "min_labels": 50, "min_quality": {"recall": 0.7}})
    terrible = {"recall": figure(0.0, 0.0, 0.1, n=49)}
    evaluation = judge(spec, QualityWindow(49, terrible))
    assert evaluation.verdict == "insufficient"
    (check,) = [c for c in evaluation.checks if c.guard == "min_quality.recall"]
    assert check.status == "insufficient" and check.detail["labels"] == 49
    assert plan(canary({"min_requests": 1}), spec, evaluation) is None
    assert judge(spec, QualityWindow(50, terrible)).verdict == "breach"
    # enough labels, but the figure is undefined yet (no positive label for recall)
    undefined = {"recall": QualityFigure(None, None, None, 0)}
    assert judge(spec, QualityWindow(500, undefined)).verdict == "insufficient"
    # a metric the version's task does not have: skipped, not a breach
    assert judge(spec, QualityWindow(500, {"mae": figure(1.0, 0.9, 1.1)})).verdict == "pass"


def test_the_drop_against_the_baseline_is_judged_on_its_upper_bound() -> None:
    spec = GuardSpec.parse({"min_requests": 1, "min_labels": 50,
                            "max_quality_drop_vs_baseline": {"accuracy": 0.05}})  # fmt: skip
    worse = QualityWindow(200, {}, {"accuracy": 0.12}, baseline_labels=400)
    evaluation = judge(spec, worse)
    assert [c.guard for c in evaluation.breaches] == ["max_quality_drop_vs_baseline.accuracy"]
    assert judge(spec, QualityWindow(200, {}, {"accuracy": 0.03}, 400)).verdict == "pass"
    # the baseline's labels count too
    assert judge(spec, QualityWindow(200, {}, {"accuracy": 0.12}, 10)).verdict == "insufficient"
    # no baseline: skipped
    drop_only = {"min_requests": 1, "max_quality_drop_vs_baseline": {"accuracy": 0.05}}
    single = parse_policy({"strategy": "single", "version": "2", "guards": drop_only}, ["2"])
    assert isinstance(single, SingleDoc)
    evaluation = evaluate(spec, single, Figures(TRAFFIC, quality={"2": worse}))
    assert {c.status for c in evaluation.checks} <= {"skipped", "pass"}


def test_a_quality_breach_rolls_the_canary_back_naming_its_condition() -> None:
    spec = GuardSpec.parse(QUALITY)
    doc = canary(QUALITY)
    worse = QualityWindow(
        200,
        {"recall": figure(0.5, 0.42, 0.58), "log_loss": figure(0.3, 0.25, 0.35)},
        {"accuracy": 0.01},
        400,
    )
    evaluation = evaluate(spec, doc, Figures(TRAFFIC, quality={"2": worse}))
    change = plan(doc, spec, evaluation)
    assert change is not None and change.action == "rollback"
    assert change.guard == "min_quality.recall"  # the audit's who: guard:min_quality.recall
    assert isinstance(change.doc, SingleDoc) and change.doc.version == "1"


def test_quality_is_judged_whatever_the_window_traffic() -> None:
    """Labels arrive days later: a candidate with little traffic in the guard window is
    still judged on its labels (the request gate holds only the traffic checks)."""
    spec = GuardSpec.parse({**QUALITY, "min_requests": 10_000})
    worse = QualityWindow(200, {"recall": figure(0.5, 0.42, 0.58)}, {}, 0)
    evaluation = evaluate(spec, canary(QUALITY), Figures(TRAFFIC, quality={"2": worse}))
    assert evaluation.verdict == "breach"


def labelled(tp: int, fn: int, fp: int, tn: int, confidence: float = 0.95) -> dict[str, Figure]:
    """A binary accumulator's figures (monitors.quality) over labelled scores: ``tp`` positives
    scored 0.9, ``fn`` scored 0.1, ``fp`` negatives scored 0.9, ``tn`` scored 0.1."""
    acc = BinaryQuality()
    scores = [0.9] * tp + [0.1] * fn + [0.9] * fp + [0.1] * tn
    acc.observe(np.array(scores), np.array([1] * (tp + fn) + [0] * (fp + tn)))
    return acc.realized(confidence)


def window(figures: dict[str, Figure], labels: int) -> QualityWindow:
    """What the guards judge of them (gateway.background.quality.Quality.windows)."""
    judged = {m: QualityFigure(f.value, f.low, f.high, f.n) for m, f in figures.items()}
    return QualityWindow(labels, {m: f for m, f in judged.items() if m in QUALITY_METRICS})


def min_quality_check(metric: str, floor: float, judged: QualityWindow, min_labels: int) -> Any:
    spec = GuardSpec.parse(
        {"min_requests": 1, "min_labels": min_labels, "min_quality": {metric: floor}}
    )
    (check,) = [c for c in judge(spec, judged).checks if c.guard == f"min_quality.{metric}"]
    return check


def test_min_quality_breaches_only_below_the_lower_end_of_the_interval_at_confidence() -> None:
    figures = labelled(tp=37, fn=13, fp=6, tn=74)
    recall, fpr = figures["recall"], figures["false_positive_rate"]
    assert recall.low is not None and fpr.high is not None
    # the two-sided interval at the guards' confidence (95 %): a one-sided 97.5 % bound
    assert recall.low == wilson(37, 50, NormalDist().inv_cdf(0.975))[0]
    judged = window(figures, 130)
    at = min_quality_check("recall", recall.low, judged, 130)
    assert (at.status, at.value) == ("pass", recall.low)  # a bound exactly at the floor passes
    above = min_quality_check("recall", math.nextafter(recall.low, 1.0), judged, 130)
    assert above.status == "breach"
    # lower is better: the interval's upper end against a ceiling
    at = min_quality_check("false_positive_rate", fpr.high, judged, 130)
    assert (at.status, at.value) == ("pass", fpr.high)
    below = min_quality_check("false_positive_rate", math.nextafter(fpr.high, 0.0), judged, 130)
    assert below.status == "breach"
    # ... given min_labels (labelled predictions): one fewer and no verdict, however bad
    assert min_quality_check("recall", 0.99, judged, 131).status == "insufficient"
    assert min_quality_check("recall", 0.99, judged, 130).status == "breach"


@pytest.mark.parametrize(
    ("tp", "fn", "status"), [(37, 13, "breach"), (370, 130, "breach"), (444, 156, "pass")]
)
def test_the_documented_recall_example(tp: int, fn: int, status: str) -> None:
    """docs/operations.md#quality-guards: recall 0.74 against a floor of 0.7."""
    judged = window(labelled(tp, fn, 0, 0), tp + fn)
    assert min_quality_check("recall", 0.7, judged, 50).status == status


def test_the_drop_breaches_only_above_its_one_sided_upper_bound_at_confidence() -> None:
    baseline = labelled(tp=90, fn=10, fp=10, tn=90)["accuracy"]  # 180 of 200
    candidate = labelled(tp=80, fn=20, fp=20, tn=80)["accuracy"]  # 160 of 200
    drop = drop_bound(candidate, baseline, 0.95)
    assert drop is not None
    # one-sided at 95 %: Newcombe's interval from each side's Wilson interval at z(0.95)
    z = NormalDist().inv_cdf(0.95)
    high, low = wilson(180, 200, z)[1], wilson(160, 200, z)[0]
    assert drop == pytest.approx(0.1 + math.hypot(high - 0.9, 0.8 - low), abs=1e-12)

    def check(limit: float, labels: int = 200, baseline_labels: int = 200) -> Any:
        spec = GuardSpec.parse({"min_requests": 1, "min_labels": 200,
                                "max_quality_drop_vs_baseline": {"accuracy": limit}})  # fmt: skip
        judged = QualityWindow(labels, {}, {"accuracy": drop}, baseline_labels)
        (found,) = [c for c in judge(spec, judged).checks if c.guard.startswith("max_quality")]
        return found

    at = check(drop)
    assert (at.status, at.value) == ("pass", drop)  # a bound exactly at the limit passes
    assert check(math.nextafter(drop, 0.0)).status == "breach"
    # given min_labels on both sides
    assert check(0.0, labels=199).status == "insufficient"
    assert check(0.0, baseline_labels=199).status == "insufficient"
    assert check(0.0).status == "breach"
