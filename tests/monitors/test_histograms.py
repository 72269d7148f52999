from __future__ import annotations

import math

import numpy as np
import pytest

from monitors import ALPHA, LatencyHistogram
from monitors.kernels import N_LATENCY_BUCKETS, empty_latency_stats

QUANTILES = [0.0, 1e-4, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999, 1.0]
# A bucket is exactly ALPHA wide either side of its value; log/exp rounding may add a few ulps.
REL_TOLERANCE = ALPHA * (1 + 1e-9)


def heavy_tailed(kind: str) -> np.ndarray:
    rng = np.random.default_rng(10)
    if kind == "lognormal":
        return rng.lognormal(-5, 1.5, 1_000_000)  # median 7 ms, p99.99 ≈ 1.7 s
    return (rng.pareto(1.2, 1_000_000) + 1) * 2e-4  # tail index 1.2: max around 20 s


def assert_quantiles_close(histogram: LatencyHistogram, x: np.ndarray) -> None:
    exact = np.quantile(x, QUANTILES, method="inverted_cdf")
    estimates = np.array([histogram.quantile(q) for q in QUANTILES])
    np.testing.assert_array_less(np.abs(estimates - exact), REL_TOLERANCE * exact)


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
def test_quantiles_within_one_percent_also_after_merging_halves(kind: str) -> None:
    x = heavy_tailed(kind)
    whole = LatencyHistogram()
    whole.record(x)
    assert_quantiles_close(whole, x)

    first, second = LatencyHistogram(), LatencyHistogram()
    first.record(x[: x.size // 2])
    second.record(x[x.size // 2 :])
    first.merge(second)
    assert_quantiles_close(first, x)
    np.testing.assert_array_equal(first.counts, whole.counts)
    assert (first.count, first.min, first.max) == (x.size, x.min(), x.max())
    # Two sequential float64 sums of 10⁶ positive terms differ by far less than 1e-9 relative.
    assert first.sum == pytest.approx(float(np.sum(x)), rel=1e-9)


def test_empty_histogram() -> None:
    histogram = LatencyHistogram()
    assert (histogram.count, histogram.sum) == (0, 0.0)
    assert math.isnan(histogram.min) and math.isnan(histogram.max)
    assert math.isnan(histogram.quantile(0.5))
    assert histogram.buckets([0.1, math.inf]).tolist() == [0, 0]


def test_non_finite_latencies_are_skipped_and_extremes_kept_exact() -> None:
    histogram = LatencyHistogram()
    histogram.record(np.array([[np.nan, 0.0], [np.inf, 2e3], [-np.inf, 5e-3]]))
    assert histogram.count == 3
    assert (histogram.min, histogram.max, histogram.sum) == (0.0, 2e3, 2e3 + 5e-3)
    assert histogram.quantile(0.0) == 0.0 and histogram.quantile(1.0) == 2e3
    assert abs(histogram.quantile(0.5) - 5e-3) <= REL_TOLERANCE * 5e-3
    with pytest.raises(ValueError, match="q"):
        histogram.quantile(-0.1)


def test_buckets_are_cumulative_prometheus_counts_within_alpha() -> None:
    x = np.sort(heavy_tailed("lognormal")[:100_000])
    histogram = LatencyHistogram()
    histogram.record(x)
    bounds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf]
    counts = histogram.buckets(bounds)
    assert counts.dtype == np.int64 and counts[-1] == x.size
    assert np.all(np.diff(counts) >= 0)
    low = np.searchsorted(x, np.multiply(bounds, 1 - ALPHA), side="right")
    high = np.searchsorted(x, np.multiply(bounds, 1 + ALPHA), side="right")
    assert np.all((low <= counts) & (counts <= high))


def test_injected_arrays_are_written_in_place() -> None:
    counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
    stats = empty_latency_stats()
    histogram = LatencyHistogram(counts, stats)
    histogram.record(np.array([1e-3, 2e-3]))
    assert counts.sum() == 2 and stats[0] == pytest.approx(3e-3)

    copy = histogram.copy()
    copy.record(np.array([1.0]))
    assert (histogram.count, copy.count) == (2, 3)


@pytest.mark.parametrize(
    ("counts", "stats", "message"),
    [
        pytest.param(np.zeros(10, np.int64), None, "latency counts", id="short"),
        pytest.param(np.zeros(N_LATENCY_BUCKETS), None, "latency counts", id="float-counts"),
        pytest.param(None, np.zeros(4), "latency stats", id="long-stats"),
        pytest.param(
            np.zeros(2 * N_LATENCY_BUCKETS, np.int64)[::2], None, "latency counts", id="strided"
        ),
    ],
)
def test_injected_arrays_are_checked(
    counts: np.ndarray | None, stats: np.ndarray | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LatencyHistogram(counts, stats)
