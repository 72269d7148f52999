"""The current window and the cumulative view since load.

Counts live in a ring of ``n_slots`` sub-histograms of ``window_s / n_slots`` seconds each. The
slot for time ``now`` is ``floor(now / slot_s) mod n_slots``; when a write reaches a new slot, the
slots it reuses are first folded into ``retired`` and cleared. So the current window is the sum of
the slots written in the last ``n_slots`` ticks (a value leaves it between ``window_s - slot_s``
and ``window_s`` seconds after it was recorded), and the cumulative view is ``retired`` plus every
slot. Time is passed in; nothing here reads a clock. A time earlier than the newest slot writes
into the newest slot.

Reading (``live``, ``window``, ``cumulative``) writes nothing, but a read from another thread may
see a rotation half done: read from the writer's thread for an exact view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from monitors import kernels
from monitors.histograms import LatencyHistogram, check_array
from monitors.kernels import MAX, MIN, N_LATENCY_BUCKETS, SUM

_NEVER = -(2**62)


class Ring(Protocol):
    def retire(self, slot: int) -> None:
        """Fold ``slot`` into the cumulative part and clear it."""
        ...


class Window:
    """Maps time to a ring slot and retires the slots it reuses, for every ring it drives."""

    __slots__ = ("_rings", "_slot", "_tick", "n_slots", "slot_s", "ticks", "window_s")

    def __init__(
        self,
        rings: Sequence[Ring],
        window_s: float = 300.0,
        n_slots: int = 10,
        ticks: np.ndarray | None = None,
    ) -> None:
        if not (window_s > 0 and math.isfinite(window_s)) or n_slots < 1:
            raise ValueError(f"need window_s > 0 and n_slots >= 1, got {window_s}, {n_slots}")
        self.window_s = float(window_s)
        self.n_slots = n_slots
        self.slot_s = self.window_s / n_slots
        if ticks is None:
            ticks = np.full(n_slots, _NEVER, np.int64)
        # The tick (absolute slot number) each slot holds.
        self.ticks = check_array(ticks, np.int64, (n_slots,), "window ticks")
        self._rings = tuple(rings)
        self._tick = int(self.ticks.max())
        self._slot = self._tick % n_slots

    def slot(self, now: float) -> int:
        """The ring slot to write at ``now``, retiring expired slots first."""
        tick = math.floor(now / self.slot_s)
        if tick > self._tick:
            self._advance(tick)
        return self._slot

    def _advance(self, tick: int) -> None:
        for t in range(max(self._tick + 1, tick - self.n_slots + 1), tick + 1):
            slot = t % self.n_slots
            for ring in self._rings:
                ring.retire(slot)
            self.ticks[slot] = t
        self._tick = tick
        self._slot = tick % self.n_slots

    def live(self, now: float) -> np.ndarray:
        """Indices of the slots inside the current window at ``now``."""
        oldest = math.floor(now / self.slot_s) - self.n_slots
        live: np.ndarray = np.flatnonzero(self.ticks > oldest)
        return live


class CountRing:
    """A ring of column counts ``(n_slots, n_columns, kernels.WIDTH)`` and their retired sum."""

    __slots__ = ("counts", "retired")

    def __init__(self, counts: np.ndarray, retired: np.ndarray) -> None:
        if counts.ndim != 3 or counts.shape[2] != kernels.WIDTH:
            raise ValueError(f"ring counts must be (n_slots, n_columns, {kernels.WIDTH})")
        self.counts = check_array(counts, np.int64, counts.shape, "ring counts")
        self.retired = check_array(retired, np.int64, counts.shape[1:], "retired counts")

    @classmethod
    def allocate(cls, n_slots: int, n_columns: int) -> CountRing:
        shape = (n_columns, kernels.WIDTH)
        return cls(np.zeros((n_slots, *shape), np.int64), np.zeros(shape, np.int64))

    def retire(self, slot: int) -> None:
        kernels.add_counts(self.retired, self.counts[slot])
        self.counts[slot] = 0

    def window(self, live: np.ndarray) -> np.ndarray:
        """New counts: the sum of the ``live`` slots."""
        total: np.ndarray = self.counts[live].sum(axis=0)
        return total

    def cumulative(self) -> np.ndarray:
        """New counts: everything since allocation."""
        total: np.ndarray = self.counts.sum(axis=0)
        total += self.retired
        return total


class LatencyRing:
    """A ring of latency histograms, one per series: counts ``(n_slots, n_series,
    N_LATENCY_BUCKETS)``, stats ``(n_slots, n_series, 3)``, and each series' retired histogram."""

    __slots__ = ("counts", "retired", "stats")

    def __init__(
        self, counts: np.ndarray, stats: np.ndarray, retired: Sequence[LatencyHistogram]
    ) -> None:
        shape = (counts.shape[0], len(retired))
        self.counts = check_array(counts, np.int64, (*shape, N_LATENCY_BUCKETS), "ring counts")
        self.stats = check_array(stats, np.float64, (*shape, 3), "ring stats")
        self.retired = tuple(retired)

    @classmethod
    def allocate(cls, n_slots: int, n_series: int) -> LatencyRing:
        return cls(
            np.zeros((n_slots, n_series, N_LATENCY_BUCKETS), np.int64),
            kernels.empty_latency_stats(n_slots, n_series),
            [LatencyHistogram() for _ in range(n_series)],
        )

    def record_pairs(self, slot: int, first: np.ndarray, second: np.ndarray) -> None:
        """Record into series 0 and 1 at once (each request's two latencies, 1-D float64)."""
        kernels.record_pairs_at(self.counts, self.stats, slot, first, second)

    def retire(self, slot: int) -> None:
        for series, retired in enumerate(self.retired):
            retired.merge(LatencyHistogram(self.counts[slot, series], self.stats[slot, series]))
        self.counts[slot] = 0
        self.stats[slot] = kernels.empty_latency_stats(len(self.retired))

    def window(self, live: np.ndarray) -> list[LatencyHistogram]:
        """Per series, the merge of the ``live`` slots."""
        return self._histograms(*self.merged(live))

    def cumulative(self) -> list[LatencyHistogram]:
        """Per series, everything since allocation."""
        return self._histograms(*self.merged(None))

    def merged(self, live: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """New counts ``(n_series, N_LATENCY_BUCKETS)`` and stats ``(n_series, 3)``: per series,
        the merge of the ``live`` slots, or of everything since allocation when None."""
        slots = self.stats if live is None else self.stats[live]
        stats = np.empty((len(self.retired), 3), np.float64)
        stats[:, SUM] = slots[:, :, SUM].sum(axis=0)
        stats[:, MIN] = slots[:, :, MIN].min(axis=0, initial=math.inf)
        stats[:, MAX] = slots[:, :, MAX].max(axis=0, initial=-math.inf)
        counts: np.ndarray = (self.counts if live is None else self.counts[live]).sum(axis=0)
        if live is None:
            for total, retired in zip(self._histograms(counts, stats), self.retired, strict=True):
                total.merge(retired)
        return counts, stats

    @staticmethod
    def _histograms(counts: np.ndarray, stats: np.ndarray) -> list[LatencyHistogram]:
        return [LatencyHistogram(c, s) for c, s in zip(counts, stats, strict=True)]
