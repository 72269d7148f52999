from __future__ import annotations

import math

import numpy as np
import pytest

from monitors.drift import BinProfile
from monitors.kernels import WIDTH, observe_columns
from monitors.windows import CountRing, LatencyRing, Window

PROFILE = BinProfile.fit(np.arange(100.0).reshape(-1, 1), ["x"])


def make(window_s: float = 10.0, n_slots: int = 10) -> tuple[Window, CountRing, LatencyRing]:
    counts = CountRing.allocate(n_slots, 1)
    latency = LatencyRing.allocate(n_slots, 2)
    return Window([counts, latency], window_s, n_slots), counts, latency


def record(window: Window, counts: CountRing, latency: LatencyRing, now: float) -> None:
    slot = window.slot(now)
    observe_columns(counts.counts, slot, np.array([[50.0]]), PROFILE.table)
    latency.record_pairs(slot, np.array([now + 1.0]), np.array([now + 2.0]))


def total(counts: np.ndarray) -> int:
    return int(counts[0, :WIDTH].sum())


def test_values_leave_the_window_after_window_s_and_stay_cumulative() -> None:
    rng = np.random.default_rng(11)
    times = np.sort(rng.uniform(0, 100, 400))
    window, counts, latency = make(window_s=10.0, n_slots=10)
    for i, t in enumerate(times):
        record(window, counts, latency, t)
        now = times[i]
        live = window.live(now)
        seen = times[: i + 1]
        # Slot granularity: anything older than window_s is out, anything younger than
        # window_s - slot_s is in; in between it depends on the slot boundary.
        in_window = total(counts.window(live))
        assert np.count_nonzero(now - seen < 9.0) <= in_window
        assert in_window <= np.count_nonzero(now - seen < 10.0)
        exact = np.count_nonzero(np.floor(seen) > math.floor(now) - 10)
        assert in_window == exact
        total_s, model_s = latency.window(live)
        assert total_s.count == model_s.count == exact
        assert total(counts.cumulative()) == i + 1
    total_s, model_s = latency.cumulative()
    assert (total_s.count, total_s.min, model_s.max) == (times.size, times[0] + 1, times[-1] + 2)


def test_reading_later_expires_without_writing() -> None:
    window, counts, latency = make()
    record(window, counts, latency, 3.5)
    assert total(counts.window(window.live(12.9))) == 1
    assert total(counts.window(window.live(13.0))) == 0
    assert latency.window(window.live(13.0))[0].count == 0
    assert total(counts.cumulative()) == 1


def test_a_long_pause_retires_every_slot() -> None:
    window, counts, latency = make()
    for t in np.arange(0.0, 10.0, 0.5):
        record(window, counts, latency, t)
    record(window, counts, latency, 1000.0)
    assert total(counts.window(window.live(1000.0))) == 1
    assert total(counts.retired) == 20 and latency.retired[0].count == 20
    assert total(counts.cumulative()) == 21 and latency.cumulative()[1].count == 21


def test_time_going_backwards_writes_the_newest_slot() -> None:
    window, counts, latency = make()
    newest = window.slot(25.0)
    assert window.slot(3.0) == newest
    record(window, counts, latency, 3.0)
    assert total(counts.window(window.live(25.0))) == 1


def test_injected_ticks_resume_the_clock() -> None:
    window, counts, latency = make()
    record(window, counts, latency, 7.2)
    resumed = Window([counts, latency], 10.0, 10, window.ticks)
    assert resumed.slot(7.9) == window.slot(7.9)
    assert total(counts.window(resumed.live(8.0))) == 1


@pytest.mark.parametrize(
    ("window_s", "n_slots"),
    [pytest.param(0.0, 10, id="zero"), pytest.param(math.inf, 10, id="inf"), (10.0, 0)],
)
def test_window_refuses_bad_settings(window_s: float, n_slots: int) -> None:
    with pytest.raises(ValueError, match="window_s"):
        Window([], window_s, n_slots)


def test_rings_check_injected_arrays() -> None:
    with pytest.raises(ValueError, match="ring counts"):
        CountRing(np.zeros((3, 2, WIDTH + 1), np.int64), np.zeros((2, WIDTH), np.int64))
    with pytest.raises(ValueError, match="retired counts"):
        CountRing(np.zeros((3, 2, WIDTH), np.int64), np.zeros((3, WIDTH), np.int64))
    ring = LatencyRing.allocate(3, 2)
    with pytest.raises(ValueError, match="ring stats"):
        LatencyRing(ring.counts, ring.stats[:, :1].copy(), ring.retired)
