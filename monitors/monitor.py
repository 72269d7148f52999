from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitors import kernels
from monitors.drift import BinProfile, assess
from monitors.export import Layout, MonitorCounts, ViewCounts, fingerprint
from monitors.histograms import LatencyHistogram
from monitors.windows import CountRing, LatencyRing, Window

log = logging.getLogger("turnout.monitors")

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
LATENCY_SERIES = ("total", "model")
# ``observe`` only buffers a request; the buffer is counted in one pass of the kernels
# when it holds FLUSH_REQUESTS requests or FLUSH_ROWS rows, when its oldest request is
# FLUSH_AGE_S old, and before any read. Counting one request at a time cost 9 µs inside a
# server (cold caches at every call) against 2 µs in a tight loop; in batches it costs ~1 µs.
FLUSH_REQUESTS = 64
FLUSH_ROWS = 4096
FLUSH_AGE_S = 0.25


_FLOAT16 = np.dtype(np.float16)


def as_rows(tensor: np.ndarray) -> np.ndarray:
    """View a tensor as (rows, columns): the first axis is the batch, the rest are flattened.
    float16, which numba cannot read, becomes float32."""
    if tensor.dtype is _FLOAT16:
        tensor = tensor.astype(np.float32)
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim == 1:
        return tensor.reshape(-1, 1)
    if tensor.ndim == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))


@dataclass(frozen=True, slots=True, eq=False)
class Columns:
    """Profiled columns of one tensor and the ring counting them."""

    tensor: str
    profile: BinProfile
    ring: CountRing


def _rows_of(tensor: np.ndarray, table: np.ndarray, output: str | None) -> np.ndarray:
    """``tensor`` (the features, or the named output) as (rows, columns) for the kernels;
    ValueError when its column count is not the reference's (``table``'s rows)."""
    rows = tensor if tensor.ndim == 2 and tensor.dtype is not _FLOAT16 else as_rows(tensor)
    if rows.shape[1] != table.shape[0]:
        what = "features" if output is None else f"output {output!r}"
        raise ValueError(
            f"{what}: {rows.shape[1]} columns, the reference has {table.shape[0]} columns"
        )
    return rows


# A buffered request, as ``observe`` took it: (now, features, outputs, total_s, model_s).
_Pending = tuple[float, np.ndarray | None, Mapping[str, np.ndarray], float, float]


def _stack(parts: list[np.ndarray], table: np.ndarray) -> np.ndarray | None:
    """``parts`` stacked as (rows, columns) for the kernels when every part has the reference's
    column count (``table``'s rows) and needs no reshaping: checked once on the stack, since
    a concatenation agrees on every axis but the first. None otherwise."""
    try:
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    except ValueError:  # ranks or trailing shapes differ
        return None
    if rows.ndim == 1 and table.shape[0] == 1:
        rows = rows.reshape(-1, 1)
    if rows.ndim != 2 or rows.shape[1] != table.shape[0]:
        return None
    return rows.astype(np.float32) if rows.dtype is _FLOAT16 else rows


def latency_summary(histogram: LatencyHistogram) -> dict[str, Any]:
    """JSON-ready count, sum, min, max and quantiles; null where an empty histogram has none."""
    count = histogram.count
    summary: dict[str, Any] = {
        "count": count,
        "sum": histogram.sum,
        "min": histogram.min if count else None,
        "max": histogram.max if count else None,
    }
    for key, q in QUANTILES.items():
        summary[key] = histogram.quantile(q) if count else None
    return summary


class VersionMonitor:
    """Drift and latency of one model version: ``observe`` on the hot path, ``snapshot`` off it.
    Across processes: each ``export``s its counts, a reader merges them (``MonitorCounts.merge``)
    and ``report``s them with any monitor of the same ``fingerprint``.

        Single writer: call ``observe`` (and ``snapshot``, for an exact view) from one thread, the
        event loop. Times are seconds on one monotonic clock, passed in as ``now``. A buffered
        request is counted in the window slot of its own time, at the next flush.
    """

    __slots__ = (
        "_features",
        "_layout",
        "_outputs",
        "_pending",
        "_pending_rows",
        "_window",
        "bounds",
        "features",
        "fingerprint",
        "latency",
        "outputs",
        "skipped",
    )

    def __init__(
        self,
        features: Columns | None,
        outputs: Sequence[Columns],
        latency: LatencyRing,
        window_s: float = 300.0,
        ticks: np.ndarray | None = None,
    ) -> None:
        """``latency`` has two series, ``LATENCY_SERIES``. Every ring must have the same number
        of slots; arrays may be injected (``ticks`` and each ring's) so that they can later live
        in shared memory."""
        if len(latency.retired) != len(LATENCY_SERIES):
            raise ValueError(f"the latency ring needs the series {LATENCY_SERIES}")
        self.features = features
        self.outputs = tuple(outputs)
        self.latency = latency
        rings: list[CountRing | LatencyRing] = [latency]
        rings += [c.ring for c in self.outputs] + ([features.ring] if features else [])
        n_slots = {ring.counts.shape[0] for ring in rings}
        if len(n_slots) != 1:
            raise ValueError(f"rings disagree on the number of slots: {sorted(n_slots)}")
        self._window = Window(rings, window_s, n_slots.pop(), ticks)
        # The hot path's arguments, looked up once.
        self._features = (
            None if features is None else (features.ring.counts, features.profile.table)
        )
        self._outputs = tuple((c.tensor, c.ring.counts, c.profile.table) for c in self.outputs)
        # What observe buffered since the last flush, in arrival order.
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self.skipped = 0  # requests not counted: a tensor's columns differ from the reference
        # The reference inputs' per-feature (minimum, maximum), NaNs ignored; None without one.
        self.bounds: tuple[np.ndarray, np.ndarray] | None = None
        self.fingerprint = fingerprint(
            self._window.window_s,
            None if features is None else features.profile,
            [(c.tensor, c.profile) for c in self.outputs],
            LATENCY_SERIES,
        )
        self._layout: Layout = (
            None if features is None else features.profile.n_columns,
            tuple(c.profile.n_columns for c in self.outputs),
            len(LATENCY_SERIES),
        )

    @classmethod
    def fit(
        cls,
        reference_inputs: np.ndarray | None,
        reference_outputs: Mapping[str, np.ndarray],
        feature_names: Sequence[str] | None = None,
        window_s: float = 300.0,
        n_slots: int = 10,
    ) -> VersionMonitor:
        """Fit the drift profiles (see monitors.drift) on the reference inputs (rows, features)
        and on the outputs the model computed from them; non-numeric outputs (strings) are not
        monitored. No reference: drift stays empty. Fitting compiles the kernels for the
        reference dtypes, if ``warm_up`` has not."""
        features = None
        if reference_inputs is not None:
            inputs = np.asarray(reference_inputs)
            if inputs.ndim != 2:
                raise ValueError(f"reference inputs must be (rows, features), got {inputs.shape}")
            names = feature_names or [f"f{j}" for j in range(inputs.shape[1])]
            profile = BinProfile.fit(inputs, names)
            features = Columns("", profile, CountRing.allocate(n_slots, profile.n_columns))
        outputs = []
        for tensor, values in reference_outputs.items():
            rows = as_rows(np.asarray(values))
            if rows.dtype.kind not in "biuf":
                continue
            names = (
                [tensor] if rows.shape[1] == 1 else [f"{tensor}[{j}]" for j in range(rows.shape[1])]
            )
            profile = BinProfile.fit(rows, names)
            outputs.append(Columns(tensor, profile, CountRing.allocate(n_slots, len(names))))
        latency = LatencyRing.allocate(n_slots, len(LATENCY_SERIES))
        monitor = cls(features, outputs, latency, window_s)
        if features is not None and inputs.dtype.kind in "biuf" and inputs.shape[0]:
            with np.errstate(all="ignore"):
                monitor.bounds = (np.nanmin(inputs, axis=0), np.nanmax(inputs, axis=0))
        return monitor

    def observe(
        self,
        features: np.ndarray | None,
        outputs: Mapping[str, np.ndarray],
        total_s: float,
        model_s: float,
        now: float,
    ) -> None:
        """Take one request: its features (rows, n_features) of the first input, its outputs
        (first axis the batch; unknown names ignored) and its latencies. Only buffered here:
        the next flush (see FLUSH_REQUESTS) checks and counts it, and skips, counting in
        ``skipped``, a request whose tensors' column counts differ from the reference. Any
        numeric dtype is taken; ``kernels.WARM_DTYPES`` and the reference's never wait for
        compilation, others compile once per process (from the disk cache after the first).
        The arrays are kept until the flush: callers must not change them afterwards."""
        pending = self._pending
        pending.append((now, features, outputs, total_s, model_s))
        if features is not None:
            self._pending_rows += features.shape[0] if features.ndim else 1
        if (
            len(pending) >= FLUSH_REQUESTS
            or self._pending_rows >= FLUSH_ROWS
            or now - pending[0][0] >= FLUSH_AGE_S
        ):
            self.flush()

    def flush(self) -> None:
        """Count what ``observe`` buffered, each request in the window slot of its own time."""
        pending = self._pending
        if not pending:
            return
        self._pending, self._pending_rows = [], 0
        slot_s = self._window.slot_s
        start = 0
        while start < len(pending):
            tick = math.floor(pending[start][0] / slot_s)
            end = len(pending)
            if math.floor(pending[-1][0] / slot_s) != tick:  # rare: the buffer spans slots
                end = start + 1
                while end < len(pending) and math.floor(pending[end][0] / slot_s) == tick:
                    end += 1
            self._count(pending[start:end], self._window.slot(pending[start][0]))
            start = end

    def _count(self, group: list[_Pending], slot: int) -> None:
        """Count ``group`` into ``slot``: each monitored tensor stacked over the requests and
        checked at once; when a stack does not fit its reference, each request is checked
        alone and those that do not fit are skipped."""
        stacks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self._features is not None:
            parts = [p[1] for p in group if p[1] is not None]
            if parts:
                counts, table = self._features
                rows = _stack(parts, table)
                if rows is None:
                    return self._count(self._fitting(group), slot)
                stacks.append((counts, table, rows))
        for tensor, counts, table in self._outputs:
            parts = [rows for p in group if (rows := p[2].get(tensor)) is not None]
            if parts:
                rows = _stack(parts, table)
                if rows is None:
                    return self._count(self._fitting(group), slot)
                stacks.append((counts, table, rows))
        for counts, table, rows in stacks:
            kernels.observe_columns(counts, slot, rows, table)
        if group:
            self.latency.record_pairs(
                slot,
                np.array([p[3] for p in group], np.float64),
                np.array([p[4] for p in group], np.float64),
            )
        return None

    def _fitting(self, group: list[_Pending]) -> list[_Pending]:
        """The requests of ``group`` whose tensors fit their references, as (rows, columns);
        the others are counted in ``skipped``."""
        fitting: list[_Pending] = []
        for now, features, outputs, total_s, model_s in group:
            try:
                if features is not None and self._features is not None:
                    features = _rows_of(features, self._features[1], None)
                monitored = {}
                for tensor, _, table in self._outputs:
                    rows = outputs.get(tensor)
                    if rows is not None:
                        monitored[tensor] = _rows_of(rows, table, tensor)
            except ValueError as exc:
                if not self.skipped:
                    log.warning("monitor skips requests it cannot count, first: %s", exc)
                self.skipped += 1
                continue
            fitting.append((now, features, monitored, total_s, model_s))
        return fitting

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-ready drift and latency of the current window at ``now`` and since load."""
        return self.report(self.export(now))

    def cumulative_latency(self) -> dict[str, LatencyHistogram]:
        """Merged copies since load, by series (``total``, ``model``): for a Prometheus
        histogram export (``.buckets(bounds)``, ``.count``, ``.sum``)."""
        self.flush()
        return dict(zip(LATENCY_SERIES, self.latency.cumulative(), strict=True))

    def export(self, now: float) -> MonitorCounts:
        """Copies of the counts of the current window at ``now`` and since load, to merge with
        other processes' (``MonitorCounts.merge``). Writes nothing; exact from the writer's
        thread, like ``snapshot``."""
        self.flush()
        live = self._window.live(now)
        return MonitorCounts(
            self.fingerprint, self._window.window_s, self._view(live), self._view(None)
        )

    def report(self, counts: MonitorCounts) -> dict[str, Any]:
        """``snapshot``'s JSON from exported (and possibly merged) counts: ``snapshot(now) ==
        report(export(now))``. ValueError for counts of another fingerprint."""
        self._check(counts)
        current = self._report(counts.window)
        return {
            "window_s": counts.window_s,
            **current,
            "cumulative": self._report(counts.cumulative),
        }

    def latency_from(self, counts: MonitorCounts) -> dict[str, LatencyHistogram]:
        """``cumulative_latency`` from exported (and possibly merged) counts."""
        self._check(counts)
        return dict(zip(LATENCY_SERIES, counts.cumulative.latency(), strict=True))

    def _check(self, counts: MonitorCounts) -> None:
        if counts.fingerprint != self.fingerprint or counts.window.layout != self._layout:
            raise ValueError(
                f"counts of fingerprint {counts.fingerprint} cannot be read by a monitor of "
                f"fingerprint {self.fingerprint}: other profiles, layout or window"
            )

    def _view(self, live: np.ndarray | None) -> ViewCounts:
        def counts(ring: CountRing) -> np.ndarray:
            return ring.cumulative() if live is None else ring.window(live)

        return ViewCounts(
            None if self.features is None else counts(self.features.ring),
            tuple(counts(columns.ring) for columns in self.outputs),
            *self.latency.merged(live),
        )

    def _report(self, view: ViewCounts) -> dict[str, Any]:
        features: list[dict[str, Any]] = []
        if self.features is not None and view.features is not None:
            drifts = assess(self.features.profile, view.features)
            features = [drift.as_json() for drift in drifts]
        outputs: list[dict[str, Any]] = []
        for columns, counts in zip(self.outputs, view.outputs, strict=True):
            for drift in assess(columns.profile, counts):
                outputs.append({**drift.as_json(), "index": len(outputs), "tensor": columns.tensor})
        return {
            "features": features,
            "outputs": outputs,
            "latency": {
                series: latency_summary(histogram)
                for series, histogram in zip(LATENCY_SERIES, view.latency(), strict=True)
            },
        }
