from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from monitors import kernels
from monitors.kernels import MAX, MIN, N_LATENCY_BUCKETS, SUM


def check_array(array: np.ndarray, dtype: type, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Validate an injected count array once, so kernels never see a wrong layout."""
    if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        raise ValueError(
            f"{what} must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, "
            f"got {array.dtype} {array.shape}"
        )
    if not array.flags.writeable:
        raise ValueError(f"{what} must be writable")
    return array


class LatencyHistogram:
    """Latencies in seconds, log-bucketed: every quantile within 1 % relative (kernels.ALPHA) of
    the exact nearest-rank value for latencies between 1 µs and 1000 s; exact count, sum, min and
    max; mergeable. Prometheus export: ``buckets(bounds)``.

    The arrays may be injected (shared memory later); they are written in place. Not thread-safe:
    one writer, and readers on the writer's thread.
    """

    __slots__ = ("_counts", "_stats")

    def __init__(self, counts: np.ndarray | None = None, stats: np.ndarray | None = None) -> None:
        if counts is None:
            counts = np.zeros(N_LATENCY_BUCKETS, np.int64)
        if stats is None:
            stats = kernels.empty_latency_stats()
        self._counts = check_array(counts, np.int64, (N_LATENCY_BUCKETS,), "latency counts")
        self._stats = check_array(stats, np.float64, (3,), "latency stats")

    def record(self, seconds: np.ndarray) -> None:
        """Add latencies (any shape); NaN and ±inf are skipped."""
        values = np.ascontiguousarray(seconds, dtype=np.float64).reshape(-1)
        kernels.record_latency(self._counts, self._stats, values)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (``np.quantile(x, q, method="inverted_cdf")`` within 1 %);
        NaN when empty. Below 1 µs the answer is the minimum, above 1000 s the maximum."""
        return float(kernels.quantile(self._counts, self._stats, float(q)))

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other`` into this histogram."""
        kernels.merge_latency(self._counts, self._stats, other._counts, other._stats)

    def buckets(self, bounds: Sequence[float] | np.ndarray) -> np.ndarray:
        """Cumulative counts at the given upper bounds (Prometheus ``le``), int64. A log bucket
        counts toward a bound when its representative value is ``<= bound``, so each count lies
        between the exact counts at ``bound·0.99`` and ``bound·1.01``."""
        limits = np.ascontiguousarray(bounds, dtype=np.float64).reshape(-1)
        result: np.ndarray = kernels.cumulative_counts(self._counts, limits)
        return result

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self._counts.copy(), self._stats.copy())

    @property
    def counts(self) -> np.ndarray:
        """The bucket counts (see kernels: underflow, log buckets, overflow), a live array."""
        return self._counts

    @property
    def count(self) -> int:
        return int(self._counts.sum())

    @property
    def sum(self) -> float:
        return float(self._stats[SUM])

    @property
    def min(self) -> float:
        """The smallest latency recorded, NaN when empty."""
        return float(self._stats[MIN]) if self.count else math.nan

    @property
    def max(self) -> float:
        return float(self._stats[MAX]) if self.count else math.nan
