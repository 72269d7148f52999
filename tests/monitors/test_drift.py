"""The drift definition against an independent float64 numpy implementation of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import monitors
from monitors.drift import ACT_PSI, BinProfile, assess, fit_column, status_of
from monitors.kernels import WIDTH, observe_columns


def numpy_fit(reference: np.ndarray) -> tuple[bool, np.ndarray]:
    """Edges by nearest rank ceil(k·n/10) in integer arithmetic, not via np.quantile."""
    x = np.sort(reference[np.isfinite(reference)])
    distinct = np.unique(x)
    if distinct.size <= 20:
        return True, distinct
    ranks = np.array([-(-k * x.size // 10) for k in range(1, 10)])
    edges = np.unique(x[ranks - 1])
    return False, edges[edges > x[0]]


def numpy_counts(categorical: bool, edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    x = values[np.isfinite(values)].astype(np.float64)
    if categorical:
        found = np.searchsorted(edges, x)
        hit = np.zeros(x.size, bool)
        inside = found < edges.size
        hit[inside] = edges[found[inside]] == x[inside]
        bins = np.where(hit, found, edges.size)
    else:
        bins = np.searchsorted(edges, x, side="right")
    return np.bincount(bins, minlength=edges.size + 1)


def numpy_psi(reference: np.ndarray, current: np.ndarray) -> float:
    categorical, edges = numpy_fit(reference.astype(np.float64))
    r = numpy_counts(categorical, edges, reference)
    c = numpy_counts(categorical, edges, current)
    b = r.size
    e = (r + 0.5) / (r.sum() + 0.5 * b)
    a = (c + 0.5) / (c.sum() + 0.5 * b)
    return float(np.sum((a - e) * np.log(a / e)))


def samples(case: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, case)))
    normal = rng.normal
    match case:
        case "same":
            return normal(0, 1, 5000), normal(0, 1, 3000)
        case "shifted":
            return normal(0, 1, 5000), normal(0.3, 1.2, 3000)
        case "ties":
            return np.round(normal(0, 1, 5000), 1), np.round(normal(0.1, 1, 3000), 1)
        case "zero-inflated":
            ref = np.where(rng.random(5000) < 0.6, 0.0, rng.lognormal(0, 1, 5000))
            return ref, np.where(rng.random(3000) < 0.4, 0.0, rng.lognormal(0, 1, 3000))
        case "mostly-zero":  # > 90 % on the minimum: no edge survives, one bin
            ref = np.where(rng.random(5000) < 0.95, 0.0, rng.lognormal(0, 1, 5000))
            return ref, rng.lognormal(0, 1, 3000)
        case "out-of-range":
            return rng.uniform(0, 1, 5000), rng.uniform(-0.5, 1.5, 3000)
        case "tiny":
            return normal(0, 1, 25), normal(0, 1, 3)
        case "integer-codes":
            return rng.integers(0, 5, 5000), rng.integers(0, 7, 3000)
        case "twenty-one-codes":
            return rng.integers(0, 21, 5000), rng.integers(0, 21, 3000)
        case "disjoint":
            return rng.uniform(0, 1, 5000), rng.uniform(5, 6, 3000)
        case "constant":
            return np.full(100, 3.0), normal(3, 1, 100)
        case "nan-and-inf":
            ref = normal(0, 1, 5000)
            ref[::7] = np.nan
            cur = normal(0, 1, 3000)
            cur[::5], cur[1::11] = np.inf, -np.inf
            return ref, cur
        case "empty-current":
            return normal(0, 1, 100), np.array([])
        case "float32":
            return normal(0, 1, 5000).astype(np.float32), normal(0, 1, 3000).astype(np.float32)
    raise AssertionError(case)


CASES = [
    "same",
    "shifted",
    "ties",
    "zero-inflated",
    "mostly-zero",
    "out-of-range",
    "tiny",
    "integer-codes",
    "twenty-one-codes",
    "disjoint",
    "constant",
    "nan-and-inf",
    "empty-current",
    "float32",
]


@pytest.mark.parametrize("case", CASES)
def test_psi_matches_numpy(case: str) -> None:
    reference, current = samples(case)
    assert monitors.psi(reference, current) == pytest.approx(
        numpy_psi(reference, current), rel=1e-9
    )


@pytest.mark.parametrize("case", CASES)
def test_fit_matches_nearest_rank_and_numpy_quantiles(case: str) -> None:
    reference, _ = samples(case)
    categorical, edges = fit_column(reference)
    expected_categorical, expected_edges = numpy_fit(reference.astype(np.float64))
    assert categorical == expected_categorical
    np.testing.assert_array_equal(edges, expected_edges)
    if not categorical:
        finite = reference[np.isfinite(reference)].astype(np.float64)
        quantiles = np.unique(np.quantile(finite, np.arange(1, 10) / 10, method="inverted_cdf"))
        np.testing.assert_array_equal(edges, quantiles[quantiles > finite.min()])


def test_fit_leaves_no_reference_bin_empty() -> None:
    rng = np.random.default_rng(7)
    for reference in (rng.normal(size=1000), np.round(rng.exponential(size=1000), 1)):
        profile = BinProfile.fit(reference.reshape(-1, 1), ["x"])
        assert np.all(profile.reference[0, : profile.n_bins(0)] > 0)


def test_disjoint_samples_give_a_large_psi() -> None:
    assert monitors.psi(*samples("disjoint")) > 5
    assert monitors.psi(*samples("same")) < 0.01


def test_psi_takes_one_dimensional_arrays() -> None:
    with pytest.raises(ValueError, match="1-D"):
        monitors.psi(np.zeros((3, 2)), np.zeros(3))


def current_counts(profile: BinProfile, current: np.ndarray) -> np.ndarray:
    counts = np.zeros((1, profile.n_columns, WIDTH), np.int64)
    observe_columns(counts, 0, current, profile.table)
    columns: np.ndarray = counts[0]
    return columns


def test_assess_reports_fractions_counts_and_the_chi_square_p_value() -> None:
    reference, current = samples("nan-and-inf")
    reference = np.column_stack([reference, samples("out-of-range")[0]])
    current = np.column_stack([current, samples("out-of-range")[1]])
    profile = BinProfile.fit(reference, ["a", "b"])
    a, b = assess(profile, current_counts(profile, current))

    assert (a.name, a.index, b.name, b.index) == ("a", 0, "b", 1)
    finite = np.isfinite(current[:, 0])
    assert a.count == np.count_nonzero(finite)
    assert a.reference_count == np.count_nonzero(np.isfinite(reference[:, 0]))
    assert a.missing == pytest.approx(np.count_nonzero(~finite) / current.shape[0], rel=1e-12)
    outside = (current[:, 1] < reference[:, 1].min()) | (current[:, 1] > reference[:, 1].max())
    assert b.out_of_range == pytest.approx(np.mean(outside), rel=1e-12)
    assert b.missing == 0.0

    for drift, column in ((a, 0), (b, 1)):
        assert drift.psi == pytest.approx(numpy_psi(reference[:, column], current[:, column]))
        dof = len(drift.current) - 1
        noise = 1 / drift.reference_count + 1 / drift.count
        assert drift.p_value == pytest.approx(stats.chi2.sf(drift.psi / noise, dof), rel=1e-9)
        assert drift.critical_psi == pytest.approx(stats.chi2.ppf(0.99, dof) * noise, rel=1e-9)
        assert sum(drift.reference) == pytest.approx(1.0) and sum(drift.current) == pytest.approx(1)
        assert len(drift.edges) == len(drift.current) - 1


@pytest.mark.parametrize(
    ("psi", "critical", "current", "reference", "status"),
    [
        pytest.param(5.0, 0.01, 999, 10_000, "insufficient", id="too-few-current"),
        pytest.param(5.0, 0.01, 1000, 0, "insufficient", id="empty-reference"),
        pytest.param(0.25, 0.01, 1000, 10_000, "act", id="act-at-threshold"),
        pytest.param(0.2499, 0.01, 1000, 10_000, "watch", id="watch-below-act"),
        pytest.param(0.1, 0.01, 1000, 10_000, "watch", id="watch-at-threshold"),
        pytest.param(0.0999, 0.01, 1000, 10_000, "stable", id="stable"),
        pytest.param(0.3, 0.4, 1000, 50, "stable", id="noise-dominates"),
        pytest.param(0.5, 0.4, 1000, 50, "act", id="beyond-noise"),
        pytest.param(0.3, 0.28, 1000, 50, "act", id="act-beyond-noise"),
        pytest.param(0.2, 0.15, 1000, 50, "watch", id="watch-beyond-noise"),
    ],
)
def test_status_thresholds(
    psi: float, critical: float, current: int, reference: int, status: str
) -> None:
    assert status_of(psi, critical, current, reference) == status


def statuses(reference: np.ndarray, current: np.ndarray) -> str:
    profile = BinProfile.fit(reference.reshape(-1, 1), ["x"])
    (drift,) = assess(profile, current_counts(profile, current.reshape(-1, 1)))
    return drift.status


def test_status_of_real_samples() -> None:
    rng = np.random.default_rng(8)
    reference = rng.normal(0, 1, 10_000)
    assert statuses(reference, rng.normal(1, 1, 999)) == "insufficient"
    assert statuses(reference, rng.normal(1, 1, 1000)) == "act"
    # Same distribution: PSI is about (B - 1)(1/N + 1/M) ≈ 0.003, far below 0.1.
    assert statuses(reference, rng.normal(0, 1, 5000)) == "stable"
    assert statuses(reference, np.full(2000, np.nan)) == "insufficient"


def test_a_tiny_reference_raises_the_bar() -> None:
    rng = np.random.default_rng(9)
    reference = rng.normal(0, 1, 60)
    profile = BinProfile.fit(reference.reshape(-1, 1), ["x"])
    (drift,) = assess(profile, current_counts(profile, rng.normal(0, 1, 5000).reshape(-1, 1)))
    # χ²₀.₉₉(9)·(1/60 + 1/5000) ≈ 0.37: sampling noise of 60 values alone can reach that.
    assert drift.critical_psi > ACT_PSI
    assert drift.status in ("stable", "watch")


@pytest.mark.parametrize(
    ("reference", "status", "critical"),
    [
        pytest.param(np.full(50, np.nan), "insufficient", None, id="all-nan"),
        pytest.param(np.zeros(0), "insufficient", None, id="empty"),
        pytest.param(np.full(50, 2.0), "act", float, id="constant"),
    ],
)
def test_degenerate_references_give_json_numbers(
    reference: np.ndarray, status: str, critical: type | None
) -> None:
    profile = BinProfile.fit(reference.reshape(-1, 1), ["x"])
    (drift,) = assess(profile, current_counts(profile, np.ones((3000, 1))))
    report = drift.as_json()
    assert report["status"] == status
    assert math.isfinite(report["psi"]) and 0.0 <= report["p_value"] <= 1.0
    if critical is None:
        assert report["critical_psi"] is None and report["p_value"] == 1.0
    else:
        assert isinstance(report["critical_psi"], critical)


def test_profile_refuses_bad_references() -> None:
    with pytest.raises(ValueError, match="2-D"):
        BinProfile.fit(np.zeros(3), ["x"])
    with pytest.raises(ValueError, match="2 columns"):
        BinProfile.fit(np.zeros((3, 1)), ["x", "y"])
    with pytest.raises(ValueError, match="numeric"):
        BinProfile.fit(np.array([["a"]]), ["x"])
