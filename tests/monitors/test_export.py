from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from monitors import VersionMonitor
from monitors.export import MonitorCounts, ViewCounts

WINDOW_S = 60.0
N_ROWS = 4000
STEP_S = 0.03  # N_ROWS rows span 120 s: half the stream has left the window at the end
NOW = N_ROWS * STEP_S


def model(features: np.ndarray) -> dict[str, np.ndarray]:
    score = 1 / (1 + np.exp(-features[:, 0]))
    return {
        "label": (score > 0.5).astype(np.int64),
        "probabilities": np.column_stack([1 - score, score]).astype(np.float32),
    }


def features(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    x = np.column_stack(
        [rng.normal(shift, 1, rows), rng.integers(0, 4, rows) + (shift > 0), rng.normal(0, 1, rows)]
    )
    x[::10, 2] = np.nan
    return x.astype(np.float32)


def fitted(seed: int = 1, window_s: float = WINDOW_S) -> VersionMonitor:
    x = features(np.random.default_rng(seed), 3000)
    return VersionMonitor.fit(x, model(x), ["age", "code", "gappy"], window_s=window_s)


def stream(seed: int, rows: int = N_ROWS) -> np.ndarray:
    """Drifting traffic, so that the window's statuses are not all "insufficient"."""
    return features(np.random.default_rng(seed), rows, shift=0.3)


def observe(monitor: VersionMonitor, x: np.ndarray, rows: np.ndarray, batch: int = 8) -> None:
    """Observe rows ``rows`` of ``x`` at time row·STEP_S. Latencies are multiples of 2^-16 s,
    so every sum is exact in float64 whatever the order of the additions."""
    for i in range(0, rows.size, batch):
        chosen = rows[i : i + batch]
        first = int(chosen[0])
        total_s = (1 + first % 997) / 2**16
        monitor.observe(x[chosen], model(x[chosen]), total_s, total_s / 2, first * STEP_S)


def assert_same_view(a: ViewCounts, b: ViewCounts) -> None:
    assert a.layout == b.layout
    assert (a.features is None) == (b.features is None)
    if a.features is not None and b.features is not None:
        np.testing.assert_array_equal(a.features, b.features, strict=True)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        np.testing.assert_array_equal(x, y, strict=True)
    np.testing.assert_array_equal(a.latency_counts, b.latency_counts, strict=True)
    np.testing.assert_array_equal(a.latency_stats, b.latency_stats, strict=True)


def assert_same(a: MonitorCounts, b: MonitorCounts) -> None:
    assert (a.fingerprint, a.window_s) == (b.fingerprint, b.window_s)
    assert_same_view(a.window, b.window)
    assert_same_view(a.cumulative, b.cumulative)


Split = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
SPLITS: dict[str, Split] = {
    "halves": lambda rows: (rows[: rows.size // 2], rows[rows.size // 2 :]),
    "round-robin": lambda rows: (rows[rows % 16 < 8], rows[rows % 16 >= 8]),
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_merged_halves_report_what_one_monitor_of_the_whole_stream_reports(split: Split) -> None:
    x, rows = stream(2), np.arange(N_ROWS)
    whole, first, second = fitted(), fitted(), fitted()
    observe(whole, x, rows)
    part_a, part_b = split(rows)
    observe(first, x, part_a)
    observe(second, x, part_b)

    merged = MonitorCounts.from_bytes(first.export(NOW).to_bytes()).merge(
        MonitorCounts.from_bytes(second.export(NOW).to_bytes())
    )
    expected = whole.snapshot(NOW)
    assert first.report(merged) == expected
    assert second.report(merged) == expected
    # The test means something only if the window holds part of the stream, enough to judge.
    window_count = expected["latency"]["total"]["count"]
    assert 0 < window_count < expected["cumulative"]["latency"]["total"]["count"]
    assert {f["status"] for f in expected["features"]} - {"insufficient"}
    # Each part alone reports something else.
    assert first.snapshot(NOW) != expected

    histograms = first.latency_from(merged)
    for series, histogram in whole.cumulative_latency().items():
        np.testing.assert_array_equal(histograms[series].counts, histogram.counts)
        assert (histograms[series].sum, histograms[series].min) == (histogram.sum, histogram.min)
        assert histograms[series].max == histogram.max
        assert [histograms[series].quantile(q) for q in (0.5, 0.99)] == [
            histogram.quantile(q) for q in (0.5, 0.99)
        ]


@pytest.mark.parametrize("now", [0.0, 30.0, NOW, NOW + WINDOW_S])
def test_snapshot_is_the_report_of_the_export_through_bytes(now: float) -> None:
    monitor = fitted()
    observe(monitor, stream(3), np.arange(N_ROWS // 2))
    counts = MonitorCounts.from_bytes(monitor.export(now).to_bytes())
    assert monitor.report(counts) == monitor.snapshot(now)
    json.dumps(monitor.report(counts), allow_nan=False)


def test_latency_from_the_export_is_the_cumulative_latency() -> None:
    monitor = fitted()
    rng = np.random.default_rng(4)
    for t, seconds in enumerate(rng.lognormal(-5, 1, 500)):
        monitor.observe(None, {}, seconds, seconds / 3, now=float(t))
    exported = monitor.latency_from(monitor.export(500.0))
    for series, histogram in monitor.cumulative_latency().items():
        np.testing.assert_array_equal(exported[series].counts, histogram.counts)
        assert exported[series].sum == histogram.sum and exported[series].count == 500
        assert (exported[series].min, exported[series].max) == (histogram.min, histogram.max)


def no_traffic() -> MonitorCounts:
    return fitted().export(0.0)


def latency_only() -> MonitorCounts:
    monitor = VersionMonitor.fit(None, {}, window_s=WINDOW_S)
    monitor.observe(None, {}, 0.25, 0.125, now=0.0)
    return monitor.export(1.0)


def busy() -> MonitorCounts:
    monitor = fitted()
    observe(monitor, stream(5), np.arange(N_ROWS), batch=1)
    return monitor.export(NOW)


EXPORTS = {"no traffic": no_traffic, "latency only": latency_only, "busy": busy}


@pytest.mark.parametrize("make", EXPORTS.values(), ids=EXPORTS.keys())
def test_bytes_round_trip_exactly(make: Callable[[], MonitorCounts]) -> None:
    counts = make()
    data = counts.to_bytes()
    back = MonitorCounts.from_bytes(data)
    assert_same(back, counts)
    assert back.to_bytes() == data


def test_bytes_are_compact() -> None:
    """Sparse latency buckets and zlib: far below the dense int64 arrays."""
    counts = busy()
    views = (counts.window, counts.cumulative)
    dense = sum(a.nbytes for v in views for a in (*v.outputs, v.latency_counts, v.latency_stats))
    dense += sum(v.features.nbytes for v in views if v.features is not None)
    assert len(counts.to_bytes()) < dense / 5


def rebuilt(data: bytes, edit: Callable[[dict[str, Any]], object]) -> bytes:
    """``data`` with its JSON header edited (the layout the module documents)."""
    magic, version, size = struct.unpack_from("<4sBI", data)
    header = json.loads(data[9 : 9 + size])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<4sBI", magic, version, len(text)) + text + data[9 + size :]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


GOOD = latency_only().to_bytes()
HEADER_END = 9 + struct.unpack_from("<4sBI", GOOD)[2]
GARBAGE = {
    "empty": b"",
    "text": b"not monitor counts at all",
    "random": np.random.default_rng(6).bytes(len(GOOD)),
    "other version": GOOD[:4] + b"\x02" + GOOD[5:],
    "huge header": GOOD[:5] + struct.pack("<I", 2**31) + GOOD[9:],
    "header not json": GOOD[:9] + b"{" * (HEADER_END - 9) + GOOD[HEADER_END:],
    "header nested too deep": GOOD[:5] + struct.pack("<I", 60_000) + b"[" * 60_000,
    "header not a dict": rebuilt(GOOD, lambda h: h.clear()),
    "field missing": rebuilt(GOOD, lambda h: h.pop("nonzero")),
    "field of wrong type": rebuilt(GOOD, lambda h: h.update(series="2")),
    "more buckets than the body": rebuilt(GOOD, lambda h: h.update(nonzero=[1, 1, 2, 1])),
    "window not positive": rebuilt(GOOD, lambda h: h.update(window_s=-1.0)),
    "extra byte": GOOD + b"\x00",
    "corrupt body": flip(GOOD, HEADER_END + 5),
    "corrupt checksum": flip(GOOD, len(GOOD) - 1),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="monitor counts"):
        MonitorCounts.from_bytes(data)


def test_every_truncation_is_refused() -> None:
    data = busy().to_bytes()
    for end in range(len(data)):
        with pytest.raises(ValueError, match="monitor counts"):
            MonitorCounts.from_bytes(data[:end])


def with_latency(counts: MonitorCounts, latency: np.ndarray, stats: np.ndarray) -> MonitorCounts:
    window = counts.window
    view = ViewCounts(window.features, window.outputs, latency, stats)
    return MonitorCounts(counts.fingerprint, counts.window_s, view, counts.cumulative)


def test_inconsistent_counts_are_refused() -> None:
    counts = latency_only()
    latency, stats = counts.window.latency_counts, counts.window.latency_stats
    negative = latency.copy()
    negative[0, 0] = -1
    stats_without_counts = stats.copy()
    stats_without_counts[1] = stats[0]
    for data in (
        with_latency(counts, negative, stats).to_bytes(),
        with_latency(counts, np.zeros_like(latency), stats_without_counts).to_bytes(),
        with_latency(counts, latency, np.full_like(stats, np.nan)).to_bytes(),
    ):
        with pytest.raises(ValueError, match="monitor counts"):
            MonitorCounts.from_bytes(data)
    with pytest.raises(ValueError, match="latency counts"):
        with_latency(counts, latency.astype(np.int32), stats)


OTHERS: dict[str, Callable[[], VersionMonitor]] = {
    "other reference": lambda: fitted(seed=7),
    "other window": lambda: fitted(window_s=2 * WINDOW_S),
    "no reference": lambda: VersionMonitor.fit(None, {}, window_s=WINDOW_S),
}


@pytest.mark.parametrize("other", OTHERS.values(), ids=OTHERS.keys())
def test_counts_of_another_fingerprint_cannot_be_merged_or_read(
    other: Callable[[], VersionMonitor],
) -> None:
    monitor, foreign = fitted(), other()
    assert monitor.fingerprint == fitted().fingerprint  # a fit is deterministic
    assert foreign.fingerprint != monitor.fingerprint
    ours, theirs = monitor.export(0.0), foreign.export(0.0)
    with pytest.raises(ValueError, match="fingerprint"):
        ours.merge(theirs)
    with pytest.raises(ValueError, match="fingerprint"):
        monitor.report(theirs)
    with pytest.raises(ValueError, match="fingerprint"):
        monitor.latency_from(theirs)


def random_traffic(seed: int) -> MonitorCounts:
    monitor = fitted()
    rng = np.random.default_rng(seed)
    x = stream(seed, rows=600)
    for i, seconds in enumerate(rng.lognormal(-6, 1.5, 100)):
        rows = x[6 * i : 6 * i + 6]
        monitor.observe(rows, model(rows), seconds, seconds / 2, now=float(i))
    return monitor.export(100.0)


def test_merging_is_commutative_and_associative() -> None:
    a, b, c = (random_traffic(seed) for seed in (8, 9, 10))
    left, right, reversed_ = (a.merge(b)).merge(c), a.merge(b.merge(c)), c.merge(b).merge(a)
    for merged in (right, reversed_):
        for x, y in ((left.window, merged.window), (left.cumulative, merged.cumulative)):
            assert x.features is not None and y.features is not None
            np.testing.assert_array_equal(x.features, y.features)
            for p, q in zip(x.outputs, y.outputs, strict=True):
                np.testing.assert_array_equal(p, q)
            np.testing.assert_array_equal(x.latency_counts, y.latency_counts)
            np.testing.assert_array_equal(x.latency_stats[:, 1:], y.latency_stats[:, 1:])
            # Sums of three positive terms in another order: each within 2 ulp-units
            # (2·2⁻⁵³ relative) of the exact sum, so within 4·2⁻⁵³ < 1e-15 of each other.
            np.testing.assert_allclose(x.latency_stats[:, 0], y.latency_stats[:, 0], rtol=1e-15)
    assert_same(a.merge(b), b.merge(a))  # two terms: float addition commutes exactly


def test_merging_nothing_changes_nothing() -> None:
    counts, empty = random_traffic(11), no_traffic()
    assert_same(counts.merge(empty), counts)
    assert_same(empty.merge(counts), counts)
