"""Quality figures against numpy and scipy references, their intervals' coverage, the CBPE
estimate under calibration and under concept drift, hostile input, merging and bytes."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from statistics import NormalDist
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, rankdata

from monitors import (
    BinaryQuality,
    Figure,
    MulticlassQuality,
    QualityWindows,
    RegressionQuality,
    drop_bound,
    warm_up,
)
from monitors import quality_kernels as qk
from monitors.quality import BINARY_FIGURES, ESTIMATED_FIGURES, MAX_CLASSES, wilson

Z95 = NormalDist().inv_cdf(0.975)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sigmoid(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return result


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann–Whitney: the positives' mid-ranks (ties count ½)."""
    ranks = rankdata(scores.astype(np.float64))
    positives = labels.astype(bool)
    p, n = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - p * (p + 1) / 2) / (p * n))


# ---- score bins ------------------------------------------------------------------------------


def test_layout_fills_two_to_the_fourteen_bins() -> None:
    assert qk.LOW_TAIL + 2 * qk.N_TAIL + qk.N_LINEAR + 1 == qk.N_BINS == 1 << 14
    assert qk.D_MIN < 1.1e-16  # below the spacing of float64 at 1: 1 - p never falls in bin TOP
    # the tails continue the linear grid: a log bin at D0 is as wide as a linear bin
    assert pytest.approx(qk.LINEAR_WIDTH, rel=0.01) == qk.D0 * (1 - 1 / qk.TAIL_GAMMA)
    assert np.all(np.diff(qk.BIN_EDGES) >= 0)  # near 1 some edges round to the same float
    assert np.all((qk.BIN_EDGES[:-1] <= qk.BIN_VALUES) & (qk.BIN_EDGES[1:] >= qk.BIN_VALUES))


def test_bins_never_decrease_with_the_score() -> None:
    rng = np.random.default_rng(0)
    special = [0.0, 1.0, qk.D0, 1 - qk.D0, qk.D_MIN, 1 - qk.D_MIN, 0.5, np.nextafter(1.0, 0)]
    scores = np.sort(
        np.concatenate(
            [
                rng.random(20_000),
                10 ** rng.uniform(-300, 0, 5_000),
                1 - 10 ** rng.uniform(-16, 0, 5_000),
                special,
                np.nextafter(special, 2.0),
                np.nextafter(special, -1.0),
            ]
        ).clip(0, 1)
    )
    bins = np.array([qk.score_bin(p) for p in scores])
    assert np.all(np.diff(bins) >= 0)
    assert bins[0] == 0 and bins[-1] == qk.TOP


def test_every_bin_wider_than_float_spacing_holds_its_middle() -> None:
    middle = qk.BIN_VALUES
    # near 1, bins narrower than the float64 spacing of 1 - p cannot all be reached
    wide = np.diff(qk.BIN_EDGES) > 1e3 * np.spacing(np.maximum(qk.BIN_EDGES[1:], 1e-300))
    wide[[0, qk.TOP]] = True
    bins = np.array([qk.score_bin(p) for p in middle])
    np.testing.assert_array_equal(bins[wide], np.flatnonzero(wide))
    assert wide.sum() > 14_500  # all but the high tail's bins of 1 - p below ~1e-13


# ---- realized binary figures -----------------------------------------------------------------


def auc_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    n = 1_000_000
    cases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    s = rng.beta(2, 5, n)
    cases["calibrated-beta"] = s, rng.random(n) < s
    s = rng.uniform(0.49, 0.51, n)
    cases["all-in-0.49-0.51"] = s, rng.random(n) < sigmoid((s - 0.5) / 0.002)
    s = rng.normal(0.5, 0.004, n)
    cases["normal-sd-0.004"] = s, rng.random(n) < s
    y = rng.random(n) < 0.3
    cases["near-1"] = sigmoid(np.where(y, rng.normal(11, 1.5, n), rng.normal(9, 1.5, n))), y
    y = rng.random(n) < 0.3
    cases["near-0"] = sigmoid(np.where(y, rng.normal(-20, 1.5, n), rng.normal(-22, 1.5, n))), y
    y = rng.random(n) < 0.3
    logit = np.where(y, rng.normal(9, 1, n), rng.normal(8, 1, n))
    cases["float32-near-1"] = sigmoid(logit).astype(np.float32), y
    y = rng.random(n) < 0.5
    cases["both-ends"] = sigmoid(np.where(y, 1, -1) * rng.normal(12, 6, n)), y
    s = np.round(rng.random(n), 1)
    cases["discrete"] = s, rng.random(n) < s
    return cases


AUC_CASES = auc_cases()


@pytest.mark.parametrize("case", list(AUC_CASES))
def test_binned_auc_within_0_005_of_the_exact_auc_on_a_million_scores(case: str) -> None:
    scores, labels = AUC_CASES[case]
    quality = BinaryQuality()
    assert quality.observe(scores, labels) == 0
    auc = quality.realized()["roc_auc"]
    exact = exact_auc(scores, labels)
    assert auc.value is not None
    error = abs(auc.value - exact)
    assert error <= 0.005
    # the bound the figure carries is a true bound (pairs within one bin are off by ½ at most)
    assert error <= auc.bias_bound + 1e-12
    if case != "discrete":  # exact ties share a bin rightly: the bound is loose there, not wrong
        assert auc.bias_bound <= 0.005
    assert auc.low is not None and auc.high is not None
    assert auc.low <= exact <= auc.high


def test_confusion_counts_brier_and_log_loss_are_exact() -> None:
    rng = np.random.default_rng(2)
    n = 50_000
    raw = rng.normal(0.5, 0.4, n)  # about 11 % outside [0, 1]: clipped
    raw[:100] = 0.3  # exactly at the threshold: predicted positive
    labels = (rng.random(n) < 0.4).astype(np.int64)
    quality = BinaryQuality(threshold=0.3)
    assert quality.observe(raw, labels) == 0
    figures = quality.realized()

    p = raw.clip(0, 1)
    predicted = p >= 0.3
    truth = labels == 1
    expected = {
        "tp": np.sum(predicted & truth),
        "fp": np.sum(predicted & ~truth),
        "tn": np.sum(~predicted & ~truth),
        "fn": np.sum(~predicted & truth),
    }
    for key, value in expected.items():
        assert figures[key] == Figure(float(value), float(value), float(value), n, kind="count")
    assert figures["accuracy"].value == (expected["tp"] + expected["tn"]) / n
    assert figures["precision"].value == expected["tp"] / (expected["tp"] + expected["fp"])
    assert figures["recall"].value == expected["tp"] / truth.sum()
    assert figures["recall"].n == truth.sum()
    assert figures["false_positive_rate"].value == expected["fp"] / (~truth).sum()

    brier = (p - labels) ** 2
    clipped = p.clip(1e-15, 1 - 1e-15)
    loss = -np.where(truth, np.log(clipped), np.log1p(-clipped))
    for key, terms in (("brier", brier), ("log_loss", loss)):
        figure = figures[key]
        assert figure.value == pytest.approx(terms.mean(), rel=1e-12)
        half = Z95 * terms.std(ddof=1) / math.sqrt(n)
        assert figure.low == pytest.approx(terms.mean() - half, rel=1e-9)
        assert figure.high == pytest.approx(terms.mean() + half, rel=1e-9)
        assert figure.higher_is_better is False


def test_log_loss_clips_certain_wrong_answers_at_1e_15() -> None:
    quality = BinaryQuality()
    quality.observe(np.array([0.0, 1.0, 1.0, 0.0]), np.array([1, 0, 1, 0]))
    # two answers cost -ln(1e-15) each (up to the rounding of 1 - 1e-15), two cost ~0
    assert quality.realized()["log_loss"].value == pytest.approx(-math.log(1e-15) / 2, rel=1e-4)


def test_proportions_carry_the_wilson_interval() -> None:
    quality = BinaryQuality()
    # 56 of 70 right: Newcombe's (1998) example, checked against scipy's Wilson interval
    quality.observe(np.r_[np.full(56, 0.9), np.full(14, 0.9)], np.r_[np.ones(56), np.zeros(14)])
    for confidence in (0.9, 0.95, 0.99):
        accuracy = quality.realized(confidence)["accuracy"]
        reference = binomtest(56, 70).proportion_ci(confidence, method="wilson")
        assert (accuracy.low, accuracy.high) == pytest.approx((reference.low, reference.high))
        assert accuracy.n == 70


def test_empty_and_one_sided_figures_are_none() -> None:
    empty = BinaryQuality()
    for key, figure in empty.realized().items():
        assert figure.n == 0
        if key not in ("tp", "fp", "tn", "fn"):
            assert figure.as_json() == {"value": None, "low": None, "high": None, "n": 0}
    for figure in empty.estimated().values():
        assert figure.value is None or figure.value == 0.0
    only_negatives = BinaryQuality()
    only_negatives.observe(np.array([0.1, 0.2]), np.array([0, 0]))
    figures = only_negatives.realized()
    assert figures["precision"].value is None  # nothing predicted positive
    assert figures["recall"].value is None and figures["roc_auc"].value is None
    assert figures["brier"].value == pytest.approx(0.025)
    one = BinaryQuality()
    one.observe(np.array([0.7]), np.array([1]))
    assert one.realized()["brier"].as_json() == {
        "value": pytest.approx(0.09),
        "low": None,
        "high": None,
        "n": 1,
    }


def covered(figure: Figure, truth: float) -> bool:
    assert figure.low is not None and figure.high is not None
    return figure.low <= truth <= figure.high


# Coverage over REPS independent samples: the number covered is Binomial(REPS, 0.95) for an
# exact interval, sd √(REPS·0.95·0.05) ≈ 4.4 at 400; accept 0.95 ± 4 sd (one sided below for
# the Hanley–McNeil and normal approximations: they may be conservative, never much too narrow).
REPS = 400
COVERAGE_LOW = 0.95 - 4 * math.sqrt(0.95 * 0.05 / REPS)


def test_intervals_cover_the_true_values_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(3)
    n, shift = 400, 1.2
    true_auc = NormalDist().cdf(shift / math.sqrt(2))  # binormal, equal variances
    # E[(p - y)²] for p uniform and y ~ Bernoulli(p): E[p(1 - p)] = 1/6
    hits = {"accuracy": 0, "brier": 0, "roc_auc": 0}
    for _ in range(REPS):
        labels = rng.random(n) < 0.4
        scores = sigmoid(rng.normal(0, 1, n) + shift * labels)
        quality = BinaryQuality()
        quality.observe(scores, labels)
        hits["roc_auc"] += covered(quality.realized()["roc_auc"], true_auc)
        p = rng.random(n)
        calibrated = BinaryQuality()
        calibrated.observe(p, rng.random(n) < p)
        figures = calibrated.realized()
        hits["accuracy"] += covered(figures["accuracy"], 0.75)  # E[max(p, 1 - p)]
        hits["brier"] += covered(figures["brier"], 1 / 6)
    for key, hit in hits.items():
        assert hit / REPS >= COVERAGE_LOW, key
    assert hits["accuracy"] / REPS <= 0.95 + 4 * math.sqrt(0.95 * 0.05 / REPS)


# ---- CBPE ------------------------------------------------------------------------------------

TRACKED = ("accuracy", "precision", "recall", "false_positive_rate", "roc_auc", "tp", "fn")


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_estimate_tracks_realized_quality_of_a_calibrated_model(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 20_000
    scores = rng.beta(2, 3, n)
    labels = rng.random(n) < scores  # calibrated: P(y = 1 | p) = p
    quality = BinaryQuality()
    quality.observe(scores, labels)
    quality.observe_unlabelled(scores)
    realized, estimated = quality.realized(), quality.estimated()
    assert set(estimated) == set(ESTIMATED_FIGURES)
    for key in TRACKED:
        estimate, value = estimated[key], realized[key].value
        assert estimate.value is not None and estimate.se is not None and value is not None
        # Over the same rows, the realized figure is the estimate plus a sum of independent
        # Bernoulli deviations with sd estimate.se (the AUC: its Hanley–McNeil SE): |gap| < 4 sd
        # fails with probability 6e-5 per figure.
        assert abs(value - estimate.value) < 4 * estimate.se + estimate.bias_bound, key
    assert estimated["accuracy"].n == n
    assert estimated["precision"].n == np.sum(scores >= 0.5)


def test_estimate_diverges_from_realized_under_concept_drift() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    scores = rng.beta(2, 3, n)
    labels = rng.random(n) < scores**3  # the relation moved: far fewer positives at each score
    quality = BinaryQuality()
    quality.observe(scores, labels)
    quality.observe_unlabelled(scores)
    realized, estimated = quality.realized(), quality.estimated()
    for key in ("precision", "recall", "roc_auc", "tp"):
        estimate, value = estimated[key], realized[key].value
        assert estimate.value is not None and estimate.se is not None and value is not None
        assert abs(value - estimate.value) > 10 * estimate.se, key
        assert not covered(estimate, value)


def test_estimate_from_a_larger_served_sample_matches_exact_expected_counts() -> None:
    rng = np.random.default_rng(8)
    scores = rng.random(30_000).astype(np.float32)
    quality = BinaryQuality(threshold=0.7)
    assert quality.observe_unlabelled(scores) == 0
    p = scores.astype(np.float64)
    positive = p >= np.float32(0.7)
    estimated = quality.estimated()
    assert estimated["tp"].value == pytest.approx(p[positive].sum(), rel=1e-12)
    assert estimated["fp"].value == pytest.approx((1 - p[positive]).sum(), rel=1e-12)
    assert estimated["fn"].value == pytest.approx(p[~positive].sum(), rel=1e-12)
    assert estimated["tn"].value == pytest.approx((1 - p[~positive]).sum(), rel=1e-12)
    expected_auc = exact_weighted_auc(p)
    assert estimated["roc_auc"].value == pytest.approx(expected_auc, abs=1e-3)
    assert quality.labelled == 0 and quality.unlabelled == 30_000


def exact_weighted_auc(p: np.ndarray) -> float:
    """Σ over ordered pairs j ≠ k of p_j·(1 - p_k)·[s_j > s_k] / (Σp·Σ(1 - p)), by sorting."""
    order = np.sort(p)
    negatives_below = np.cumsum(1 - order) - (1 - order)
    return float(np.sum(order * negatives_below) / (order.sum() * (1 - order).sum()))


# ---- hostile input ---------------------------------------------------------------------------


def test_rows_with_nan_inf_or_bad_labels_are_rejected_and_counted() -> None:
    quality = BinaryQuality()
    scores = np.array([0.2, np.nan, np.inf, -np.inf, 0.9, 0.4, 0.6, 0.7, 5.0, -3.0])
    labels = np.array([0, 1, 0, 1, 2, -1, 0.5, np.nan, 1, 0])
    assert quality.observe(scores, labels) == 7
    assert (quality.labelled, quality.rejected) == (3, 7)
    figures = quality.realized()
    assert figures["tp"].value == 1 and figures["tn"].value == 2  # 5.0 → 1.0, -3.0 → 0.0
    assert figures["brier"].value == pytest.approx(0.04 / 3)
    assert quality.observe_unlabelled(scores) == 3
    assert (quality.unlabelled, quality.rejected_unlabelled) == (7, 3)
    assert quality.observe(np.array([]), np.array([])) == 0
    assert quality.observe_unlabelled(np.zeros((0, 1), np.float32)) == 0
    # any shape, any real dtype
    assert quality.observe(np.array([[0.7], [0.2]], np.float16), np.array([True, False])) == 0
    assert quality.observe_unlabelled(np.array([[1, 0]], np.int64)) == 0
    assert quality.observe_unlabelled(np.ones((4, 3), np.float32)[:, 1]) == 0
    assert quality.labelled == 5 and quality.unlabelled == 13


def test_caller_errors_raise_value_error() -> None:
    quality = BinaryQuality()
    with pytest.raises(ValueError, match="labels"):
        quality.observe(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="numeric"):
        quality.observe(np.array(["a"]), np.array([1]))
    with pytest.raises(ValueError, match="numeric"):
        quality.observe_unlabelled(np.array(["a"]))
    for threshold in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            BinaryQuality(threshold)
    for confidence in (0.0, 1.0, math.nan, 2.0):
        with pytest.raises(ValueError, match="confidence"):
            quality.realized(confidence)
    with pytest.raises(ValueError, match="threshold"):
        quality.merge(BinaryQuality(0.4))
    for n_classes in (0, 1, MAX_CLASSES + 1):
        with pytest.raises(ValueError, match="n_classes"):
            MulticlassQuality(n_classes)
    with pytest.raises(ValueError, match="targets"):
        RegressionQuality().observe(np.zeros(2), np.zeros(3))


def sample_binary(seed: int) -> BinaryQuality:
    rng = np.random.default_rng(seed)
    quality = BinaryQuality(0.4)
    scores = rng.random(5_000)
    quality.observe(scores, rng.random(5_000) < scores)
    quality.observe_unlabelled(rng.random(9_000))
    return quality


SAMPLES: list[Callable[[], Any]] = [
    lambda: sample_binary(9),
    BinaryQuality,
    lambda: sample_regression(10),
    RegressionQuality,
    lambda: sample_multiclass(11),
]


def sample_regression(seed: int) -> RegressionQuality:
    rng = np.random.default_rng(seed)
    quality = RegressionQuality()
    quality.observe(rng.normal(size=1000), rng.normal(size=1000))
    return quality


def sample_multiclass(seed: int) -> MulticlassQuality:
    rng = np.random.default_rng(seed)
    quality = MulticlassQuality(7)
    quality.observe(rng.integers(0, 7, 1000), rng.integers(0, 7, 1000))
    return quality


@pytest.mark.parametrize("make", SAMPLES)
def test_from_bytes_refuses_truncated_and_foreign_bytes(make: Callable[[], Any]) -> None:
    quality = make()
    kind = type(quality)
    raw = quality.to_bytes()
    for cut in range(0, len(raw), max(1, len(raw) // 40)):
        with pytest.raises(ValueError):
            kind.from_bytes(raw[:cut])
    with pytest.raises(ValueError):
        kind.from_bytes(raw + b"\0")
    for other in (BinaryQuality, RegressionQuality):
        if other is not kind:
            with pytest.raises(ValueError, match="not"):
                kind.from_bytes(other().to_bytes())
    body = zlib.decompress(raw[5:])
    with pytest.raises(ValueError):  # a body with trailing data
        kind.from_bytes(raw[:5] + zlib.compress(body + b"\0"))
    with pytest.raises(ValueError):  # far more than any layout holds: refused, not inflated
        kind.from_bytes(raw[:5] + zlib.compress(bytes(50_000_000)))


@given(st.binary(max_size=300), st.sampled_from([BinaryQuality, RegressionQuality]))
@PROPERTY
def test_from_bytes_of_garbage_raises_value_error(raw: bytes, kind: Any) -> None:
    with pytest.raises(ValueError):
        kind.from_bytes(raw)
    with pytest.raises(ValueError):
        kind.from_bytes(kind.MAGIC + b"\x01" + raw)


@given(st.data())
@PROPERTY
def test_damaged_bytes_decode_to_a_valid_value_or_raise_value_error(data: st.DataObject) -> None:
    quality = data.draw(st.sampled_from(SAMPLES))()
    body = bytearray(zlib.decompress(quality.to_bytes()[5:]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    raw = quality.MAGIC + b"\x01" + zlib.compress(bytes(body))
    try:
        decoded = type(quality).from_bytes(raw)
    except ValueError:
        return
    decoded.realized()  # whatever was accepted is consistent enough to report
    decoded.merge(type(quality).from_bytes(raw))


# ---- merge and bytes -------------------------------------------------------------------------

SCORES = st.one_of(
    st.floats(0, 1), st.floats(-2, 3), st.sampled_from([math.nan, math.inf, 0.5, 0.0, 1.0])
)
LABELS = st.sampled_from([0, 1, 1, 0, 2, math.nan])
PAIRS = st.lists(st.tuples(SCORES, LABELS), max_size=60)


def binary_of(pairs: list[tuple[float, float]], served: list[float]) -> BinaryQuality:
    quality = BinaryQuality(0.5)
    quality.observe(np.array([s for s, _ in pairs]), np.array([y for _, y in pairs]))
    quality.observe_unlabelled(np.array(served, np.float64))
    return quality


def assert_same(a: Any, b: Any) -> None:
    """Counts equal exactly, sums up to float rounding (summation order differs)."""
    assert type(a) is type(b)
    for name in ("_counts", "_tallies"):
        left, right = getattr(a, name, None), getattr(b, name, None)
        if left is None or right is None:
            assert (left is None or not left.any()) and (right is None or not right.any())
        else:
            np.testing.assert_array_equal(left, right)
    if hasattr(a, "_sums"):
        np.testing.assert_allclose(a._sums, b._sums, rtol=1e-9, atol=1e-6)


@given(PAIRS, PAIRS, st.lists(SCORES, max_size=30), st.lists(SCORES, max_size=30))
@PROPERTY
def test_binary_merge_is_observing_everything(
    first: list[tuple[float, float]],
    second: list[tuple[float, float]],
    served_first: list[float],
    served_second: list[float],
) -> None:
    merged = binary_of(first, served_first)
    merged.merge(binary_of(second, served_second))
    assert_same(merged, binary_of(first + second, served_first + served_second))
    decoded = BinaryQuality.from_bytes(merged.to_bytes())
    assert decoded.to_bytes() == merged.to_bytes()
    np.testing.assert_array_equal(decoded._sums, merged._sums)
    assert decoded.realized() == merged.realized()
    assert decoded.estimated() == merged.estimated()


# Integers: every sum and square is exact in float64, so only the M2 merge can differ.
VALUES = st.one_of(st.integers(-1000, 1000).map(float), st.sampled_from([math.nan, math.inf, 1e70]))


@given(st.lists(st.tuples(VALUES, VALUES), max_size=50), st.integers(0, 50))
@PROPERTY
def test_regression_merge_is_observing_everything(
    pairs: list[tuple[float, float]], cut: int
) -> None:
    def of(rows: list[tuple[float, float]]) -> RegressionQuality:
        quality = RegressionQuality()
        quality.observe(np.array([p for p, _ in rows]), np.array([t for _, t in rows]))
        return quality

    merged = of(pairs[:cut])
    merged.merge(of(pairs[cut:]))
    assert_same(merged, of(pairs))
    assert RegressionQuality.from_bytes(merged.to_bytes()).realized() == merged.realized()


@given(st.lists(st.tuples(st.integers(-1, 5), st.integers(-1, 5)), max_size=50), st.integers(0, 50))
@PROPERTY
def test_multiclass_merge_is_observing_everything(pairs: list[tuple[int, int]], cut: int) -> None:
    def of(rows: list[tuple[int, int]]) -> MulticlassQuality:
        quality = MulticlassQuality(5)
        quality.observe(np.array([p for p, _ in rows]), np.array([y for _, y in rows]))
        return quality

    merged = of(pairs[:cut])
    merged.merge(of(pairs[cut:]))
    assert_same(merged, of(pairs))
    decoded = MulticlassQuality.from_bytes(merged.to_bytes())
    assert decoded.realized() == merged.realized()
    assert decoded.per_class() == merged.per_class()


def test_bytes_are_compact() -> None:
    assert len(BinaryQuality().to_bytes()) < 64
    busy = sample_binary(12)
    for _ in range(20):
        busy.merge(sample_binary(13))
    # 3 × 16,384 bins, most of them busy: a few bytes a bin after narrowing and zlib
    assert len(busy.to_bytes()) < 3 * qk.N_BINS
    assert len(MulticlassQuality(MAX_CLASSES).to_bytes()) < 100


# ---- regression and multiclass ---------------------------------------------------------------


def test_regression_figures_against_numpy() -> None:
    rng = np.random.default_rng(14)
    n = 20_000
    targets = rng.normal(100, 20, n)
    predictions = targets + rng.normal(1.5, 4, n)  # biased by 1.5
    predictions[:5] = [math.nan, math.inf, 0, 0, 0]
    targets[2:5] = [math.nan, -math.inf, 1e70]
    quality = RegressionQuality()
    assert quality.observe(predictions, targets) == 5
    figures = quality.realized()
    e = (predictions - targets)[5:]
    assert quality.labelled == n - 5 == figures["mae"].n
    for key, terms in (("mae", np.abs(e)), ("bias", e)):
        assert figures[key].value == pytest.approx(terms.mean(), rel=1e-12)
        assert figures[key].se == pytest.approx(terms.std(ddof=1) / math.sqrt(e.size), rel=1e-9)
    mse, mse_se = np.mean(e**2), np.std(e**2, ddof=1) / math.sqrt(e.size)
    rmse = figures["rmse"]
    assert rmse.value == pytest.approx(math.sqrt(mse), rel=1e-12)
    assert rmse.low == pytest.approx(math.sqrt(mse - Z95 * mse_se), rel=1e-9)
    assert rmse.high == pytest.approx(math.sqrt(mse + Z95 * mse_se), rel=1e-9)
    assert figures["bias"].low is not None and figures["bias"].low > 1.3  # 1.5 - 4·4/√n·z
    assert figures["bias"].higher_is_better is None


def test_multiclass_figures_against_numpy() -> None:
    rng = np.random.default_rng(15)
    n, k = 30_000, 6
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    predicted[:3] = [-1, k, 2]
    labels[2] = 7
    quality = MulticlassQuality(k)
    assert (
        quality.observe(predicted.astype(np.float32) + np.r_[0, 0, 0, 0.5, np.zeros(n - 4)], labels)
        == 4
    )
    keep = np.arange(n) >= 4
    p, y = predicted[keep], labels[keep]
    figures = quality.realized()
    assert figures["accuracy"].value == np.mean(p == y)
    recalls = np.array([np.mean(p[y == c] == c) for c in range(k)])
    assert figures["macro_recall"].value == pytest.approx(recalls.mean(), rel=1e-12)
    per_class = quality.per_class()
    assert [f["recall"].value for f in per_class] == pytest.approx(recalls.tolist())
    assert per_class[0]["precision"].value == pytest.approx(np.mean(y[p == 0] == 0))
    assert per_class[0]["recall"].n == np.sum(y == 0)


# ---- drop_bound ------------------------------------------------------------------------------


def proportion_figure(successes: int, n: int, higher_is_better: bool = True) -> Figure:
    low, high = wilson(successes, n, Z95)
    return Figure(successes / n, low, high, n, None, "proportion", higher_is_better)


def test_drop_bound_of_proportions_is_newcombes_hybrid_score_interval() -> None:
    # Newcombe (1998), example (a): 56/70 - 48/80, method 10: 95 % interval 0.0524 to 0.3339;
    # its upper end is the one-sided 97.5 % bound.
    baseline, candidate = proportion_figure(56, 70), proportion_figure(48, 80)
    bound = drop_bound(candidate, baseline, 0.975)
    assert bound == pytest.approx(0.3339, abs=5e-5)
    # A rate where lower is better: the drop is the candidate's rise.
    assert drop_bound(
        proportion_figure(56, 70, False), proportion_figure(48, 80, False), 0.975
    ) == pytest.approx(0.3339, abs=5e-5)
    # and the other way round, the lower end of the interval, negated
    assert drop_bound(baseline, candidate, 0.975) == pytest.approx(-0.0524, abs=5e-5)


def test_drop_bound_of_means_is_the_normal_bound() -> None:
    baseline = Figure(0.10, None, None, 100, se=0.01, higher_is_better=False)
    candidate = Figure(0.13, None, None, 100, se=0.02, higher_is_better=False)
    z = NormalDist().inv_cdf(0.95)
    assert drop_bound(candidate, baseline, 0.95) == pytest.approx(0.03 + z * math.sqrt(5e-4))
    auc = Figure(0.8, None, None, 100, se=0.02, bias_bound=0.001)
    worse = Figure(0.75, None, None, 100, se=0.02, bias_bound=0.002)
    assert drop_bound(worse, auc, 0.95) == pytest.approx(0.05 + z * math.sqrt(8e-4) + 0.003)


def test_drop_bound_has_no_answer_for_counts_bias_or_missing_values() -> None:
    counts = BinaryQuality().realized()["tp"]
    assert drop_bound(counts, counts, 0.95) is None
    bias = sample_regression(16).realized()["bias"]
    assert drop_bound(bias, bias, 0.95) is None
    empty = BinaryQuality().realized()["recall"]
    full = sample_binary(17).realized()["recall"]
    assert drop_bound(empty, full, 0.95) is None
    with pytest.raises(ValueError, match="kind"):
        drop_bound(full, sample_binary(17).realized()["brier"], 0.95)
    with pytest.raises(ValueError, match="confidence"):
        drop_bound(full, full, 1.0)


def test_drop_bound_covers_the_true_drop() -> None:
    # Candidate and baseline equally good (recall 0.8, n = 300 each): the true drop is 0, and a
    # 95 % upper bound must be ≥ 0 in about 95 % of samples (tolerance as for coverage above).
    rng = np.random.default_rng(18)
    above = 0
    for _ in range(REPS):
        a, b = rng.binomial(300, 0.8, 2)
        above += (
            cast(float, drop_bound(proportion_figure(a, 300), proportion_figure(b, 300), 0.95)) >= 0
        )
    assert above / REPS >= COVERAGE_LOW


# ---- windows ---------------------------------------------------------------------------------


def test_quality_leaves_the_window_after_window_s_and_stays_cumulative() -> None:
    windows = QualityWindows(BinaryQuality, window_s=60.0, n_slots=12)
    for now in range(0, 120):
        windows.slot(float(now)).observe(np.array([0.9]), np.array([1]))
        windows.slot(float(now)).observe_unlabelled(np.array([0.9]))
        # slots of 5 s: the window holds the current slot and the 11 before it
        oldest = max(0, 5 * (now // 5 - 11))
        assert windows.window(float(now)).labelled == now - oldest + 1
        assert windows.cumulative().labelled == now + 1
    assert windows.window(1000.0).labelled == 0  # reading later expires without writing
    assert windows.cumulative().unlabelled == 120
    windows.slot(10.0).observe(np.array([0.2]), np.array([0]))  # late: into the newest slot
    assert windows.window(119.0).labelled == 61
    assert windows.window(119.0).realized()["tn"].value == 1
    copy = windows.window(119.0)
    copy.observe(np.array([0.2]), np.array([0]))
    assert windows.window(119.0).labelled == 61 and windows.window_s == 60.0


def test_idle_slots_hold_no_accumulator() -> None:
    made = []

    def make() -> RegressionQuality:
        made.append(1)
        return RegressionQuality()

    windows = QualityWindows(make, window_s=10.0, n_slots=10)
    windows.slot(0.0).observe(np.array([1.0]), np.array([0.0]))
    windows.slot(100.0).observe(np.array([3.0]), np.array([0.0]))
    assert sum(q is not None for q in windows._slots) == 1
    assert windows.cumulative().realized()["mae"].value == 2.0
    assert len(made) == 4  # the retired part, two slots, the cumulative copy


# ---- warm-up ---------------------------------------------------------------------------------

JIT_DISABLED = not hasattr(qk.auc, "signatures")
QUALITY_KERNELS = (
    qk.observe_labelled,
    qk.observe_served,
    qk.observe_regression,
    qk.observe_multiclass,
    qk.auc,
    qk.merge_moments,
)


@pytest.mark.skipif(JIT_DISABLED, reason="nothing is compiled without the jit")
def test_warm_up_compiles_every_quality_kernel_for_the_served_dtypes() -> None:
    warm_up()
    for kernel in QUALITY_KERNELS:
        assert cast(Any, kernel).signatures
    served = {str(signature[3]) for signature in cast(Any, qk.observe_served).signatures}
    for name in ("float32", "float64"):
        assert f"array({name}, 1d, C)" in served
        assert f"readonly array({name}, 1d, C)" in served
    before = {k: len(cast(Any, k).signatures) for k in QUALITY_KERNELS}
    for sample in SAMPLES:
        quality = sample()
        quality.realized()
        quality.merge(type(quality).from_bytes(quality.to_bytes()))
    binary = sample_binary(19)
    binary.estimated()
    read_only = np.frombuffer(np.array([0.3, 0.8], np.float32).tobytes(), np.float32)
    binary.observe_unlabelled(read_only)
    binary.observe(read_only, np.frombuffer(np.array([0.0, 1.0]).tobytes()))
    assert {k: len(cast(Any, k).signatures) for k in QUALITY_KERNELS} == before


def test_figure_names_are_the_documented_ones_and_json_ready() -> None:
    binary = sample_binary(20)
    assert set(binary.realized()) == set(BINARY_FIGURES)
    figures = [
        *binary.realized().values(),
        *binary.estimated().values(),
        *sample_regression(21).realized().values(),
        *sample_multiclass(22).realized().values(),
        *sample_multiclass(22).per_class()[0].values(),
    ]
    for figure in figures:  # plain Python numbers: any JSON encoder takes them
        assert {type(v) for v in figure.as_json().values()} <= {float, int}, figure
        assert type(figure.as_json()["n"]) is int
