"""Each kernel against a float64 numpy reference."""

from __future__ import annotations

import math
from typing import Any, cast

import numba
import numpy as np
import pytest

from monitors import kernels
from monitors.kernels import (
    ALPHA,
    CATEGORICAL,
    EDGES,
    GAMMA,
    HI,
    LATENCY_LOW,
    LATENCY_TOP,
    LO,
    MAX,
    MIN,
    MISSING,
    N_EDGES,
    N_LATENCY_BUCKETS,
    N_LOG_BUCKETS,
    OUT_OF_RANGE,
    PROFILE_WIDTH,
    SUM,
    WIDTH,
)

# Bucket assignment and bucket values go through log and exp: a value on a bucket boundary may
# land one bucket over, where it is still exactly ALPHA away from the bucket value, give or take
# a few ulps of those two functions.
REL_TOLERANCE = ALPHA * (1 + 1e-9)


def profile_of(edges: np.ndarray, categorical: bool, lo: float, hi: float) -> np.ndarray:
    profile = np.zeros((1, PROFILE_WIDTH))
    profile[0, [LO, HI, N_EDGES, CATEGORICAL]] = lo, hi, edges.size, float(categorical)
    profile[0, EDGES : EDGES + edges.size] = edges
    return profile


def numpy_bins(edges: np.ndarray, categorical: bool, values: np.ndarray) -> np.ndarray:
    if not categorical:
        return np.searchsorted(edges, values, side="right")
    found = np.searchsorted(edges, values)
    hit = np.zeros(values.size, bool)
    inside = found < edges.size
    hit[inside] = edges[found[inside]] == values[inside]
    return np.where(hit, found, edges.size)


def observe_one(profile: np.ndarray, values: np.ndarray) -> np.ndarray:
    counts = np.zeros((1, 1, WIDTH), np.int64)
    kernels.observe_columns(counts, 0, values.reshape(-1, 1), profile)
    column: np.ndarray = counts[0, 0]
    return column


@pytest.mark.parametrize(
    ("edges", "categorical"),
    [
        pytest.param(np.array([-1.0, 0.0, 0.5, 2.0]), False, id="numeric"),
        pytest.param(np.array([0.25]), False, id="one-edge"),
        pytest.param(np.array([]), False, id="no-edge"),
        pytest.param(np.arange(20.0), True, id="twenty-codes"),
        pytest.param(np.array([-3.5, 0.0, 7.0]), True, id="categories"),
        pytest.param(np.array([]), True, id="no-category"),
    ],
)
def test_observe_columns_bins_like_numpy(edges: np.ndarray, categorical: bool) -> None:
    rng = np.random.default_rng(1)
    # Values on the edges themselves, plus noise, plus values between them.
    values = np.concatenate([edges, rng.normal(0, 5, 500), np.round(rng.normal(0, 5, 500))])
    lo, hi = -2.0, 3.0
    counts = observe_one(profile_of(edges, categorical, lo, hi), values)

    expected = np.bincount(numpy_bins(edges, categorical, values), minlength=edges.size + 1)
    np.testing.assert_array_equal(counts[: edges.size + 1], expected)
    assert counts[edges.size + 1 : MISSING].sum() == 0
    assert counts[MISSING] == 0
    assert counts[OUT_OF_RANGE] == np.count_nonzero((values < lo) | (values > hi))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.bool_])
def test_observe_columns_accepts_model_dtypes(dtype: type) -> None:
    rng = np.random.default_rng(2)
    values = rng.random((200, 3)) > 0.5 if dtype is np.bool_ else rng.normal(0, 3, (200, 3))
    rows: np.ndarray = values.astype(dtype)
    edges = np.array([-1.0, 0.5, 1.0])
    profile = np.repeat(profile_of(edges, False, -1e9, 1e9), 3, axis=0)
    counts = np.zeros((2, 3, WIDTH), np.int64)
    rows.setflags(write=False)  # as np.frombuffer decodes
    kernels.observe_columns(counts, 1, rows, profile)

    assert counts[0].sum() == 0
    for j in range(3):
        bins = np.searchsorted(edges, rows[:, j].astype(np.float64), side="right")
        np.testing.assert_array_equal(counts[1, j, :4], np.bincount(bins, minlength=4))


def test_observe_columns_counts_nan_and_inf_apart() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 0.0, 10.0, -10.0])
    counts = observe_one(profile_of(np.array([0.0]), False, -1.0, 1.0), values)
    assert counts[MISSING] == 3
    assert counts[:2].tolist() == [1, 2]  # -10 below the edge; 0 and 10 at or above it
    assert counts[OUT_OF_RANGE] == 2


def test_observe_columns_refuses_mismatched_shapes() -> None:
    profile = np.repeat(profile_of(np.array([0.0]), False, 0, 1), 3, axis=0)
    counts = np.zeros((2, 3, WIDTH), np.int64)
    with pytest.raises(ValueError, match="columns"):
        kernels.observe_columns(counts, 0, np.zeros((1, 4)), profile)
    with pytest.raises(ValueError, match="slot"):
        kernels.observe_columns(counts, 2, np.zeros((1, 3)), profile)
    assert counts.sum() == 0


def numpy_psi(reference: np.ndarray, current: np.ndarray) -> float:
    b = reference.size
    e = (reference + 0.5) / (reference.sum() + 0.5 * b)
    a = (current + 0.5) / (current.sum() + 0.5 * b)
    return float(np.sum((a - e) * np.log(a / e)))


@pytest.mark.parametrize(
    ("reference", "current"),
    [
        pytest.param([100, 200, 300, 400], [110, 190, 310, 390], id="close"),
        pytest.param([1000, 0, 0], [0, 0, 1000], id="disjoint"),
        pytest.param([5, 5], [0, 0], id="empty-current"),
        pytest.param([0, 0, 0], [0, 0, 0], id="both-empty"),
        pytest.param([7], [3], id="one-bin"),
        pytest.param([3, 1, 4, 1, 5], [3, 1, 4, 1, 5], id="identical"),
    ],
)
def test_psi_matches_the_formula(reference: list[int], current: list[int]) -> None:
    r, c = np.array(reference, np.int64), np.array(current, np.int64)
    assert kernels.psi(r, c) == pytest.approx(numpy_psi(r, c), rel=1e-9)


def test_psi_matches_the_formula_on_random_counts() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        b = int(rng.integers(1, 22))
        r = rng.integers(0, 10_000, b)
        c = rng.integers(0, 10_000, b) * rng.integers(0, 2, b)
        assert kernels.psi(r, c) == pytest.approx(numpy_psi(r, c), rel=1e-9)


def test_psi_refuses_different_bin_counts() -> None:
    with pytest.raises(ValueError, match="bins"):
        kernels.psi(np.zeros(3, np.int64), np.zeros(4, np.int64))


def test_latency_buckets_are_within_alpha_of_their_values() -> None:
    x = np.geomspace(LATENCY_LOW * 1.0000001, LATENCY_TOP, 100_000)
    buckets = np.array([kernels.latency_bucket(v) for v in x])
    assert buckets.min() == 1 and buckets.max() == N_LOG_BUCKETS
    assert np.all(np.diff(buckets) >= 0)
    values = np.array([kernels.bucket_value(int(k)) for k in buckets])
    assert np.max(np.abs(values - x) / x) <= REL_TOLERANCE
    # Bucket k holds (LOW·γ^(k-1), LOW·γ^k], as a float64 numpy computation has it.
    upper = LATENCY_LOW * GAMMA ** buckets.astype(np.float64)
    assert np.all(x <= upper * (1 + 1e-12)) and np.all(x > upper / GAMMA * (1 - 1e-12))


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        pytest.param(-1.0, 0, id="negative"),
        pytest.param(0.0, 0, id="zero"),
        pytest.param(LATENCY_LOW, 0, id="low"),
        pytest.param(1e4, N_LATENCY_BUCKETS - 1, id="above-range"),
        pytest.param(math.inf, N_LATENCY_BUCKETS - 1, id="inf"),
    ],
)
def test_latency_bucket_edges(seconds: float, bucket: int) -> None:
    assert kernels.latency_bucket(seconds) == bucket


def test_record_and_quantile_match_nearest_rank() -> None:
    rng = np.random.default_rng(4)
    x = rng.lognormal(-6, 2, 20_001)
    counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
    stats = kernels.empty_latency_stats()
    kernels.record_latency(counts, stats, np.concatenate([x, [np.nan, np.inf, -np.inf]]))

    assert counts.sum() == x.size
    assert stats[SUM] == pytest.approx(x.sum(), rel=1e-12)
    assert (stats[MIN], stats[MAX]) == (x.min(), x.max())
    for q in np.linspace(0, 1, 101):
        exact = np.quantile(x, q, method="inverted_cdf")
        estimate = kernels.quantile(counts, stats, q)
        assert abs(estimate - exact) <= REL_TOLERANCE * exact


def test_quantile_rank_is_numpys() -> None:
    # Values ALPHA·4 apart land in different buckets, so an off-by-one rank would show.
    x = LATENCY_LOW * 10 * (1 + 4 * ALPHA) ** np.arange(1, 11)
    counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
    stats = kernels.empty_latency_stats()
    kernels.record_latency(counts, stats, x)
    for q in np.linspace(0, 1, 1001):
        exact = np.quantile(x, q, method="inverted_cdf")
        assert abs(kernels.quantile(counts, stats, q) - exact) <= REL_TOLERANCE * exact


def test_quantile_edges() -> None:
    counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
    stats = kernels.empty_latency_stats()
    assert math.isnan(kernels.quantile(counts, stats, 0.5))
    kernels.record_latency(counts, stats, np.array([1e-8, 1e-7, 3e-2, 5e4]))
    # Underflow and overflow answer the exact extremes.
    assert kernels.quantile(counts, stats, 0.0) == 1e-8
    assert kernels.quantile(counts, stats, 1.0) == 5e4
    with pytest.raises(ValueError, match="q"):
        kernels.quantile(counts, stats, 1.5)
    with pytest.raises(ValueError, match="q"):
        kernels.quantile(counts, stats, math.nan)


def test_record_pairs_at_writes_one_slot_of_two_series() -> None:
    counts = np.zeros((3, 2, N_LATENCY_BUCKETS), np.int64)
    stats = kernels.empty_latency_stats(3, 2)
    kernels.record_pairs_at(counts, stats, 1, np.array([2e-3]), np.array([1e-3]))
    kernels.record_pairs_at(counts, stats, 1, np.array([4e-3, 1e-3]), np.array([math.nan, 5e-4]))
    assert counts.sum(axis=2).tolist() == [[0, 0], [3, 2], [0, 0]]
    assert stats[1, 0].tolist() == [7e-3, 1e-3, 4e-3]
    assert stats[1, 1].tolist() == [1.5e-3, 5e-4, 1e-3]
    with pytest.raises(ValueError, match="slot"):
        kernels.record_pairs_at(counts, stats, 3, np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="length"):
        kernels.record_pairs_at(counts, stats, 0, np.ones(2), np.ones(1))


def test_cumulative_counts_bracket_the_exact_counts() -> None:
    rng = np.random.default_rng(5)
    x = np.sort(rng.lognormal(-5, 1.5, 50_000))
    counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
    kernels.record_latency(counts, kernels.empty_latency_stats(), x)
    bounds = np.array([1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.1, 1.0, math.inf, 0.0])
    result = kernels.cumulative_counts(counts, bounds)
    low = np.searchsorted(x, bounds * (1 - ALPHA), side="right")
    high = np.searchsorted(x, bounds * (1 + ALPHA), side="right")
    assert np.all((low <= result) & (result <= high))
    assert result[-2] == x.size and result[-1] == 0


def test_add_counts_and_merge_latency() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.integers(0, 9, (4, WIDTH)), rng.integers(0, 9, (4, WIDTH))
    merged = a.copy()
    kernels.add_counts(merged, b)
    np.testing.assert_array_equal(merged, a + b)
    with pytest.raises(ValueError, match="shapes"):
        kernels.add_counts(merged, b[:3])

    counts = [np.zeros(N_LATENCY_BUCKETS, np.int64) for _ in range(3)]
    stats = [kernels.empty_latency_stats() for _ in range(3)]
    x, y = rng.lognormal(-5, 1, 1000), rng.lognormal(-4, 1, 500)
    kernels.record_latency(counts[0], stats[0], x)
    kernels.record_latency(counts[1], stats[1], y)
    kernels.record_latency(counts[2], stats[2], np.concatenate([x, y]))
    kernels.merge_latency(counts[0], stats[0], counts[1], stats[1])
    np.testing.assert_array_equal(counts[0], counts[2])
    assert stats[0][[MIN, MAX]].tolist() == stats[2][[MIN, MAX]].tolist()
    assert stats[0][SUM] == pytest.approx(stats[2][SUM], rel=1e-12)

    empty_counts, empty_stats = np.zeros(N_LATENCY_BUCKETS, np.int64), kernels.empty_latency_stats()
    kernels.merge_latency(empty_counts, empty_stats, counts[2], stats[2])
    np.testing.assert_array_equal(empty_stats, stats[2])


# Under NUMBA_DISABLE_JIT the kernels are plain functions, without compiled signatures.
JIT_DISABLED = not hasattr(kernels.psi, "signatures")


@pytest.mark.skipif(JIT_DISABLED, reason="nothing is compiled without the jit")
def test_warm_up_compiles_every_kernel_for_the_hot_path_dtypes() -> None:
    kernels.warm_up()
    for kernel in (kernels.psi, kernels.record_latency, kernels.record_pairs_at, kernels.quantile):
        assert cast(Any, kernel).signatures
    observe: Any = kernels.observe_columns
    rows = {str(signature[2]) for signature in observe.signatures}
    for dtype in kernels.WARM_DTYPES:
        name = numba.from_dtype(np.dtype(dtype)).name
        assert f"array({name}, 2d, C)" in rows
        assert f"readonly array({name}, 2d, C)" in rows
