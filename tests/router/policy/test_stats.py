from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from router.policy.stats import Outcomes, SequentialResult, msprt, srm_test

ALPHA = 0.05


def test_srm_flags_a_skewed_split() -> None:
    chi2, p, flagged = srm_test({"1": 10_400, "2": 9_600}, {"1": 0.5, "2": 0.5})
    assert chi2 == pytest.approx(32.0)
    assert p < 1e-6 and flagged


def test_srm_passes_a_fair_split_and_matches_scipy() -> None:
    weights = {"a": 0.2, "b": 0.3, "c": 0.5}
    observed = np.random.default_rng(0).multinomial(20_000, list(weights.values()))
    counts = dict(zip(weights, observed.tolist(), strict=True))
    chi2, p, flagged = srm_test(counts, weights)
    reference = stats.chisquare(observed, 20_000 * np.array(list(weights.values())))
    assert (chi2, p) == pytest.approx((reference.statistic, reference.pvalue))
    assert not flagged


@pytest.mark.parametrize(
    ("counts", "weights", "expected"),
    [
        ({"1": 0, "2": 0}, {"1": 0.5, "2": 0.5}, (0.0, 1.0, False)),
        ({"1": 10, "3": 1}, {"1": 1.0}, (math.inf, 0.0, True)),
        ({"1": 10, "2": 1}, {"1": 1.0, "2": 0.0}, (math.inf, 0.0, True)),
        ({"1": 10}, {"1": 1.0, "2": 0.0}, (0.0, 1.0, False)),
    ],
    ids=["no-traffic", "unknown-arm", "zero-weight-arm", "one-live-arm"],
)
def test_srm_edge_cases(
    counts: dict[str, int], weights: dict[str, float], expected: tuple[float, float, bool]
) -> None:
    assert srm_test(counts, weights) == expected


def arm(outcomes: np.ndarray) -> Outcomes:
    return Outcomes(len(outcomes), float(outcomes.sum()), float((outcomes**2).sum()))


def peek(control: np.ndarray, treatment: np.ndarray, looks: list[int]) -> list[SequentialResult]:
    """The result at each look, carrying the running minimum p-value forward."""
    results, p = [], 1.0
    for n in looks:
        result = msprt(arm(control[:n]), arm(treatment[:n]), alpha=ALPHA, previous_p=p)
        results.append(result)
        p = result.p_value
    return results


LOOKS = list(range(100, 2001, 100))  # 20 looks per stream


def test_type_one_error_stays_below_alpha_under_repeated_looks() -> None:
    rng = np.random.default_rng(42)
    streams = 200
    rejected = naive_rejected = 0
    for _ in range(streams):
        a = (rng.random(LOOKS[-1]) < 0.2).astype(float)
        b = (rng.random(LOOKS[-1]) < 0.2).astype(float)
        results = peek(a, b, LOOKS)
        rejected += any(r.p_value <= ALPHA for r in results)
        # The fixed-horizon z-test read at every look: the peeking error mSPRT avoids.
        naive_rejected += any(
            abs(r.difference) > 1.96 * math.sqrt((a[:n].var(ddof=1) + b[:n].var(ddof=1)) / n)
            for r, n in zip(results, LOOKS, strict=True)
        )
    # Streams are independent, so rejections ~ Binomial(200, true rate); a valid test has rate
    # <= alpha, so the count stays below the binomial's 99.9 % quantile at alpha.
    bound = stats.binom.ppf(0.999, streams, ALPHA)
    assert rejected <= bound
    assert naive_rejected > bound  # the simulation is sharp enough to catch an invalid test


def test_confidence_sequence_covers_the_true_difference_at_every_look() -> None:
    rng = np.random.default_rng(7)
    streams, true_diff = 200, 0.5
    missed = 0
    for _ in range(streams):
        a = rng.normal(0.0, 2.0, LOOKS[-1])
        b = rng.normal(true_diff, 2.0, LOOKS[-1])
        missed += any(not r.lower < true_diff < r.upper for r in peek(a, b, LOOKS))
    assert missed <= stats.binom.ppf(0.999, streams, ALPHA)  # same bound as above


def test_detects_a_real_difference() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random(20_000) < 0.10).astype(float)
    b = (rng.random(20_000) < 0.13).astype(float)
    result = msprt(arm(a), arm(b), alpha=ALPHA)
    assert result.p_value < 0.01
    assert 0.0 < result.lower < 0.03 < result.upper
    assert result.difference == pytest.approx(b.mean() - a.mean())


def test_p_value_and_interval_agree() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        n_a, n_b = rng.integers(2, 500, size=2)
        a = rng.normal(0.0, 1.0, n_a)
        b = rng.normal(rng.normal(0.0, 0.3), rng.uniform(0.5, 2.0), n_b)
        result = msprt(arm(a), arm(b), alpha=ALPHA, tau=0.2)
        assert (result.p_value <= ALPHA) == (not result.lower < 0.0 < result.upper)


def test_inconclusive_without_data_and_running_minimum() -> None:
    few = msprt(Outcomes(1, 1.0, 1.0), Outcomes(5, 2.0, 2.0), previous_p=0.4)
    assert (few.p_value, few.lower, few.upper) == (0.4, -math.inf, math.inf)
    constant = msprt(Outcomes(10, 10.0, 10.0), Outcomes(10, 10.0, 10.0))
    assert constant.p_value == 1.0
    noisy = msprt(Outcomes(100, 50.0, 50.0), Outcomes(100, 50.0, 50.0), previous_p=0.2)
    assert noisy.p_value == 0.2
