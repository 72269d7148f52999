"""Statistics for the A/B report: sample-ratio mismatch and an anytime-valid comparison of arms."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from scipy import stats

SRM_ALPHA = 0.001


def srm_test(counts: Mapping[str, int], weights: Mapping[str, float]) -> tuple[float, float, bool]:
    """Chi-square goodness of fit of observed ``counts`` per arm to the configured ``weights``.

    Returns (chi2, p_value, flagged) with flagged = p < 0.001: the split is not doing what it
    was told (a biased router, arms dropping requests, bots pinned to an arm...) and the
    experiment's comparisons cannot be trusted. Weights are normalised; traffic counted on an
    arm of weight zero (or absent from ``weights``) is an infinite mismatch.
    """
    total = sum(counts.values())
    weight_sum = sum(w for w in weights.values() if w > 0.0)
    if total == 0 or weight_sum <= 0.0:
        return 0.0, 1.0, False
    if any(n > 0 and weights.get(arm, 0.0) <= 0.0 for arm, n in counts.items()):
        return math.inf, 0.0, True
    live = [arm for arm, w in weights.items() if w > 0.0]
    if len(live) < 2:
        return 0.0, 1.0, False
    chi2 = 0.0
    for arm in live:
        expected = total * weights[arm] / weight_sum
        chi2 += (counts.get(arm, 0) - expected) ** 2 / expected
    p_value = float(stats.chi2.sf(chi2, len(live) - 1))
    return chi2, p_value, p_value < SRM_ALPHA


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Sufficient statistics of one arm's outcomes: count, sum and sum of squares."""

    n: int
    total: float
    total_sq: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Unbiased sample variance (0 below two observations)."""
        if self.n < 2:
            return 0.0
        return max(self.total_sq - self.n * self.mean**2, 0.0) / (self.n - 1)


@dataclass(frozen=True, slots=True)
class SequentialResult:
    difference: float  # mean(treatment) - mean(control)
    p_value: float  # always-valid
    lower: float  # confidence sequence for the difference, level 1 - alpha
    upper: float
    tau: float  # mixing standard deviation used


def msprt(
    control: Outcomes,
    treatment: Outcomes,
    *,
    alpha: float = 0.05,
    tau: float | None = None,
    previous_p: float = 1.0,
) -> SequentialResult:
    """Mixture sequential probability ratio test (Johari, Pekelis, Walsh 2017, "Always valid
    inference"), normal mixture on the difference of means.

    With D = mean_t - mean_c and s² = var_c / n_c + var_t / n_t (plug-in sample variances,
    so validity is asymptotic in n, as in the paper), the mixture of the likelihood ratios of
    theta against theta0 = 0 over theta ~ N(0, tau²) is

        Lambda = sqrt(s² / (s² + tau²)) * exp(tau² D² / (2 s² (s² + tau²))).

    Lambda is a nonnegative martingale under the null with mean 1, so by Ville's inequality
    P(Lambda ever reaches 1/alpha) <= alpha: p = min(previous_p, 1, 1/Lambda) may be read after
    every look and the experiment stopped whenever p <= alpha. Pass the last returned p as
    ``previous_p`` to get the running minimum the paper defines. Inverting the test at every
    theta0 gives the confidence sequence D ± sqrt(s²(s² + tau²)/tau² * (2 ln(1/alpha) +
    ln((s² + tau²)/s²))), which covers the true difference at all looks with prob >= 1 - alpha;
    it excludes 0 exactly when p <= alpha (for previous_p = 1).

    ``tau`` is the scale of effects the test is tuned to detect fastest, in outcome units;
    by default a tenth of the pooled standard deviation. Fewer than two observations per arm,
    or zero variance, gives an inconclusive result (p = previous_p, infinite interval).
    """
    diff = treatment.mean - control.mean
    pooled_var = (control.variance + treatment.variance) / 2.0
    if tau is None:
        tau = 0.1 * math.sqrt(pooled_var)
    s2 = control.variance / max(control.n, 1) + treatment.variance / max(treatment.n, 1)
    if min(control.n, treatment.n) < 2 or s2 <= 0.0 or tau <= 0.0:
        return SequentialResult(diff, min(previous_p, 1.0), -math.inf, math.inf, tau)
    t2 = tau * tau
    log_lambda = 0.5 * math.log(s2 / (s2 + t2)) + t2 * diff * diff / (2.0 * s2 * (s2 + t2))
    p_value = min(previous_p, 1.0, math.exp(-log_lambda))
    half = math.sqrt(s2 * (s2 + t2) / t2 * (2.0 * math.log(1.0 / alpha) + math.log((s2 + t2) / s2)))
    return SequentialResult(diff, p_value, diff - half, diff + half, tau)
