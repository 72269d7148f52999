"""Numba kernels: pure functions over preallocated numpy arrays.

Mutating kernels update their first array arguments in place and return None; queries return new
values. Edge cases are decided here and stated in each docstring. Python callers own the arrays
(C-contiguous, the dtypes below) and validate them once, at construction, not per call.

Column counts layout, ``(n_slots, n_columns, WIDTH)`` int64: bins ``0 .. MAX_BINS-1`` (a column
with ``n`` edges uses the first ``n + 1``), then ``MISSING`` (NaN and ±inf, never binned) and
``OUT_OF_RANGE`` (finite values below the reference minimum or above its maximum; they are also
binned). A profile row, float64 of ``PROFILE_WIDTH``: ``LO``, ``HI`` (reference min and max),
``N_EDGES``, ``CATEGORICAL`` (1.0 or 0.0), then the edges (or sorted category values) from
``EDGES``. Packing the profile into one array keeps the per-call dispatch cost of the hot path low.

Latency counts, ``(N_LATENCY_BUCKETS,)`` int64: bucket 0 holds values at or below
``LATENCY_LOW``, bucket ``k`` in ``1 .. N_LOG_BUCKETS`` holds ``(LOW·γ^(k-1), LOW·γ^k]`` and the
last bucket everything above ``LATENCY_TOP``. Latency stats, ``(3,)`` float64: ``SUM``, ``MIN``,
``MAX`` (an empty histogram has ``0, +inf, -inf``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

_njit = functools.partial(numba.njit, cache=True, nogil=True)


def jit(fn: F) -> F:
    """The one set of jit options for every kernel (typed, so mypy keeps the signatures)."""
    return cast(F, _njit(fn))


MAX_EDGES = 20
MAX_BINS = MAX_EDGES + 1
MISSING = MAX_BINS
OUT_OF_RANGE = MAX_BINS + 1
WIDTH = MAX_BINS + 2

LO, HI, N_EDGES, CATEGORICAL, EDGES = 0, 1, 2, 3, 4
PROFILE_WIDTH = EDGES + MAX_EDGES

ALPHA = 0.01
GAMMA = (1.0 + ALPHA) / (1.0 - ALPHA)
LOG_GAMMA = math.log(GAMMA)
LATENCY_LOW = 1e-6
LATENCY_HIGH = 1e3
N_LOG_BUCKETS = math.ceil(math.log(LATENCY_HIGH / LATENCY_LOW) / LOG_GAMMA)
LATENCY_TOP = LATENCY_LOW * math.exp(N_LOG_BUCKETS * LOG_GAMMA)
N_LATENCY_BUCKETS = N_LOG_BUCKETS + 2
SUM, MIN, MAX = 0, 1, 2


@jit
def bin_index(profile: np.ndarray, column: int, value: float) -> int:
    """Bin of a finite ``value`` in ``column`` of ``profile``.

    Numeric: the number of edges ``<= value`` (``searchsorted(edges, value, side="right")``), so
    bins are left-closed and the two outer bins open-ended. Categorical: the position of
    ``value`` among the sorted category values by exact float64 equality, else ``n`` (the unseen
    bin). NaN is the caller's to exclude.
    """
    n = int(profile[column, N_EDGES])
    if profile[column, CATEGORICAL] == 0.0:
        # A branch-free scan: at most 9 edges, and no mispredicted jumps as a search would have.
        below = 0
        for i in range(n):
            below += profile[column, EDGES + i] <= value
        return below
    for i in range(n):
        if profile[column, EDGES + i] == value:
            return i
    return n


@jit
def observe_columns(counts: np.ndarray, slot: int, rows: np.ndarray, profile: np.ndarray) -> None:
    """Add ``rows`` (n_rows, n_columns), any real dtype, into ``counts[slot]`` in place.

    Each finite value is added to its bin and, when outside ``[LO, HI]``, to ``OUT_OF_RANGE``;
    NaN and ±inf are added to ``MISSING`` only. Zero rows is a no-op. Raises ValueError when the
    column counts of ``rows``, ``profile`` and ``counts`` disagree or ``slot`` is not in the ring,
    so a shape mismatch can never write outside ``counts``.
    """
    n_rows, n_cols = rows.shape
    if n_cols != profile.shape[0] or n_cols != counts.shape[1] or counts.shape[2] != WIDTH:
        raise ValueError("rows, profile and counts disagree on the number of columns")
    if slot < 0 or slot >= counts.shape[0]:
        raise ValueError("slot outside the ring")
    for r in range(n_rows):
        for j in range(n_cols):
            v = np.float64(rows[r, j])
            if not math.isfinite(v):
                counts[slot, j, MISSING] += 1
                continue
            counts[slot, j, bin_index(profile, j, v)] += 1
            if v < profile[j, LO] or v > profile[j, HI]:
                counts[slot, j, OUT_OF_RANGE] += 1


@jit
def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI between two count vectors over the same B bins.

    ``Σ (a - e)·ln(a / e)`` with ``e = (r + ½)/(N + ½B)`` and ``a = (c + ½)/(M + ½B)``: the half
    count keeps every term finite, so empty bins and empty samples need no special case (an
    empty side is uniform). B = 0 gives 0.0. Raises ValueError when the lengths differ.
    """
    b = reference.size
    if current.size != b:
        raise ValueError("reference and current have different numbers of bins")
    n = 0
    m = 0
    for i in range(b):
        n += reference[i]
        m += current[i]
    dn = n + 0.5 * b
    dm = m + 0.5 * b
    total = 0.0
    for i in range(b):
        e = (reference[i] + 0.5) / dn
        a = (current[i] + 0.5) / dm
        total += (a - e) * math.log(a / e)
    return total


@jit
def latency_bucket(seconds: float) -> int:
    """Bucket of a non-NaN latency: 0 at or below LATENCY_LOW (zero and negatives included),
    ``ceil(log_γ(seconds / LOW))`` inside, the overflow bucket above LATENCY_TOP (and +inf)."""
    if seconds <= LATENCY_LOW:
        return 0
    if seconds > LATENCY_TOP:
        return N_LOG_BUCKETS + 1
    k = math.ceil(math.log(seconds / LATENCY_LOW) / LOG_GAMMA)
    # Rounding in the log can step one bucket past either end of the range.
    return min(max(k, 1), N_LOG_BUCKETS)


@jit
def bucket_value(bucket: int) -> float:
    """The value that represents a bucket: ``2·LOW·γ^k/(γ + 1)`` is within ALPHA relative of
    every value of log bucket k. The underflow bucket is LATENCY_LOW, the overflow +inf."""
    if bucket <= 0:
        return LATENCY_LOW
    if bucket > N_LOG_BUCKETS:
        return math.inf
    return 2.0 * LATENCY_LOW * math.exp(bucket * LOG_GAMMA) / (GAMMA + 1.0)


@jit
def _record_at(
    counts: np.ndarray, stats: np.ndarray, slot: int, series: int, seconds: float
) -> None:
    if not math.isfinite(seconds):
        return
    counts[slot, series, latency_bucket(seconds)] += 1
    stats[slot, series, SUM] += seconds
    if seconds < stats[slot, series, MIN]:
        stats[slot, series, MIN] = seconds
    if seconds > stats[slot, series, MAX]:
        stats[slot, series, MAX] = seconds


@jit
def record_latency(counts: np.ndarray, stats: np.ndarray, seconds: np.ndarray) -> None:
    """Add every value of ``seconds`` (1-D float64) to ``counts`` (N_LATENCY_BUCKETS,) and
    ``stats`` (3,) in place. NaN and ±inf are not latencies and are skipped: not counted, not
    summed."""
    ring_counts = counts.reshape(1, 1, counts.size)
    ring_stats = stats.reshape(1, 1, stats.size)
    for i in range(seconds.size):
        _record_at(ring_counts, ring_stats, 0, 0, seconds[i])


@jit
def record_pairs_at(
    counts: np.ndarray, stats: np.ndarray, slot: int, first: np.ndarray, second: np.ndarray
) -> None:
    """Add each value of ``first`` to series 0 and of ``second`` to series 1 of ring slot
    ``slot``, in place: ``counts`` (n_slots, n_series, N_LATENCY_BUCKETS), ``stats`` (n_slots,
    n_series, 3); ``first`` and ``second`` 1-D float64, the two latencies of each request. NaN
    and ±inf skipped. Raises ValueError for a bad slot, fewer than two series or arrays of
    different lengths."""
    if slot < 0 or slot >= counts.shape[0] or slot >= stats.shape[0]:
        raise ValueError("slot outside the ring")
    if counts.shape[1] < 2 or stats.shape[1] < 2:
        raise ValueError("the ring has fewer than two series")
    if first.size != second.size:
        raise ValueError("first and second differ in length")
    for i in range(first.size):
        _record_at(counts, stats, slot, 0, first[i])
        _record_at(counts, stats, slot, 1, second[i])


@jit
def quantile(counts: np.ndarray, stats: np.ndarray, q: float) -> float:
    """Nearest-rank q-quantile estimate (numpy's ``inverted_cdf`` rank), NaN when empty.

    The rank is numpy's: 0-based index ``ceil(n·q - 1)`` clipped at 0. The estimate is the
    rank's bucket value, clamped into ``[MIN, MAX]`` (which only moves it closer): within ALPHA
    relative of the exact value for values in ``(LATENCY_LOW, LATENCY_TOP]``; the underflow
    bucket answers MIN and the overflow bucket MAX. Raises ValueError unless 0 <= q <= 1.
    """
    if not (q >= 0.0 and q <= 1.0):
        raise ValueError("q must be within [0, 1]")
    n = 0
    for i in range(counts.size):
        n += counts[i]
    if n == 0:
        return math.nan
    virtual = n * q - 1.0
    index = math.floor(virtual)
    if virtual != index:
        index += 1
    index = max(index, 0)
    seen = 0
    bucket = counts.size - 1
    for i in range(counts.size):
        seen += counts[i]
        if seen > index:
            bucket = i
            break
    low, high = float(stats[MIN]), float(stats[MAX])
    if bucket == 0:
        return low
    if bucket == counts.size - 1:
        return high
    return min(max(bucket_value(bucket), low), high)


@jit
def cumulative_counts(counts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """For each upper bound, the count of buckets whose bucket value is ``<= bound``: a
    Prometheus ``le`` count exact up to the ALPHA bucket width (it lies between the exact counts
    at ``bound·(1 - ALPHA)`` and ``bound·(1 + ALPHA)``). Bounds need not be sorted; +inf counts
    everything, NaN nothing."""
    out = np.zeros(bounds.size, np.int64)
    for j in range(bounds.size):
        total = 0
        for i in range(counts.size):
            if bucket_value(i) <= bounds[j]:
                total += counts[i]
        out[j] = total
    return out


@jit
def add_counts(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst += src`` in place, for C-contiguous arrays of one shape (the merge of counts).
    Raises ValueError when the shapes differ."""
    if dst.shape != src.shape:
        raise ValueError("cannot merge counts of different shapes")
    d = dst.reshape(dst.size)
    s = src.reshape(src.size)
    for i in range(d.size):
        d[i] += s[i]


@jit
def merge_latency(
    dst_counts: np.ndarray, dst_stats: np.ndarray, src_counts: np.ndarray, src_stats: np.ndarray
) -> None:
    """Merge one latency histogram into another in place: counts and sums add, min and max
    take the extremes (an empty side's ±inf leaves the other's untouched)."""
    add_counts(dst_counts, src_counts)
    dst_stats[SUM] += src_stats[SUM]
    dst_stats[MIN] = min(dst_stats[MIN], src_stats[MIN])
    dst_stats[MAX] = max(dst_stats[MAX], src_stats[MAX])


def empty_latency_stats(*shape: int) -> np.ndarray:
    """Stats array(s) of empty histograms, shape ``(*shape, 3)``."""
    stats = np.zeros((*shape, 3), np.float64)
    stats[..., MIN] = math.inf
    stats[..., MAX] = -math.inf
    return stats


# Dtypes the gateway meets on the hot path; each also read-only, as np.frombuffer decodes.
WARM_DTYPES = (np.float32, np.float64, np.int32, np.int64, np.bool_)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) and run every kernel once, for every dtype in
    WARM_DTYPES, writable and read-only, so that no request pays for compilation."""
    profile = np.zeros((2, PROFILE_WIDTH), np.float64)
    profile[:, N_EDGES] = 1.0
    profile[1, CATEGORICAL] = 1.0
    counts = np.zeros((1, 2, WIDTH), np.int64)
    for dtype in WARM_DTYPES:
        rows = np.ones((1, 2), dtype)
        observe_columns(counts, 0, rows, profile)
        rows.setflags(write=False)
        observe_columns(counts, 0, rows, profile)
    psi(counts[0, 0, :2], counts[0, 1, :2])
    add_counts(counts[0], counts[0].copy())

    latency = np.zeros(N_LATENCY_BUCKETS, np.int64)
    stats = empty_latency_stats()
    record_latency(latency, stats, np.array([1e-3, 2e-3]))
    ring = np.zeros((1, 2, N_LATENCY_BUCKETS), np.int64)
    ring_stats = empty_latency_stats(1, 2)
    record_pairs_at(ring, ring_stats, 0, np.array([1e-3]), np.array([2e-3]))
    merge_latency(latency, stats, ring[0, 0], ring_stats[0, 0])
    quantile(latency, stats, 0.5)
    cumulative_counts(latency, np.array([1e-3, math.inf]))
