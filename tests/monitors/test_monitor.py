from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import monitors
from monitors import ALPHA, VersionMonitor

N_REFERENCE = 5000


def reference(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """Four features: normal, integer codes, zero-inflated, and one with NaN."""
    x = np.column_stack(
        [
            rng.normal(shift, 1, rows),
            rng.integers(0, 4, rows) + (shift > 0),
            np.where(rng.random(rows) < 0.5, 0.0, rng.exponential(1 + shift, rows)),
            rng.normal(0, 1, rows),
        ]
    )
    x[::10, 3] = np.nan
    return x.astype(np.float32)


def model(features: np.ndarray) -> dict[str, np.ndarray]:
    score = 1 / (1 + np.exp(-features[:, 0]))
    return {
        "label": (score > 0.5).astype(np.int64),
        "probabilities": np.column_stack([1 - score, score]).astype(np.float32),
    }


def fitted(window_s: float = 300.0) -> tuple[VersionMonitor, np.ndarray]:
    rng = np.random.default_rng(12)
    x = reference(rng, N_REFERENCE)
    names = ["age", "code", "spend", "gappy"]
    return VersionMonitor.fit(x, model(x), names, window_s=window_s), x


def feed(monitor: VersionMonitor, x: np.ndarray, start: float, batch: int = 1) -> None:
    for i in range(0, x.shape[0], batch):
        rows = x[i : i + batch]
        monitor.observe(rows, model(rows), 2e-3 + i * 1e-6, 1e-3, start + i * 1e-3)


def by_name(report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {column["name"]: column for column in report}


def test_snapshot_layout_and_stable_traffic() -> None:
    monitor, _ = fitted()
    current = reference(np.random.default_rng(13), 2000)
    feed(monitor, current, start=0.0, batch=8)
    snapshot = monitor.snapshot(now=2.0)
    json.dumps(snapshot, allow_nan=False)

    assert snapshot["window_s"] == 300.0
    features = by_name(snapshot["features"])
    assert list(features) == ["age", "code", "spend", "gappy"]
    assert [f["index"] for f in snapshot["features"]] == [0, 1, 2, 3]
    assert {f["status"] for f in features.values()} == {"stable"}
    assert features["code"]["kind"] == "categorical" and features["code"]["categories"] == [
        0,
        1,
        2,
        3,
    ]
    assert features["age"]["kind"] == "numeric" and len(features["age"]["edges"]) == 9
    assert features["gappy"]["missing"] == pytest.approx(0.1) and features["gappy"]["count"] == 1800

    outputs = snapshot["outputs"]
    assert [o["name"] for o in outputs] == ["label", "probabilities[0]", "probabilities[1]"]
    assert [o["index"] for o in outputs] == [0, 1, 2]
    assert [o["tensor"] for o in outputs] == ["label", "probabilities", "probabilities"]
    assert {o["status"] for o in outputs} == {"stable"}

    latency = snapshot["latency"]
    assert latency["total"]["count"] == latency["model"]["count"] == 250
    assert latency["model"]["min"] == latency["model"]["max"] == 1e-3
    assert latency["total"]["max"] == pytest.approx(2e-3 + 1992e-6)
    exact = np.quantile(2e-3 + np.arange(0, 2000, 8) * 1e-6, 0.9, method="inverted_cdf")
    assert abs(latency["total"]["p90"] - exact) <= ALPHA * exact
    assert snapshot["cumulative"]["latency"] == latency


def test_snapshot_psi_is_the_offline_psi() -> None:
    monitor, x = fitted()
    current = reference(np.random.default_rng(14), 1500, shift=0.5)
    feed(monitor, current, start=0.0, batch=64)
    features = monitor.snapshot(now=1.0)["features"]
    for j, feature in enumerate(features):
        assert feature["psi"] == monitors.psi(x[:, j], current[:, j])
    assert features[1]["status"] == "act"  # codes 1-4 against 0-3: a quarter unseen


def test_drift_needs_a_thousand_values_then_acts() -> None:
    monitor, _ = fitted()
    drifted = reference(np.random.default_rng(15), 1000, shift=2.0)
    feed(monitor, drifted[:999], start=0.0, batch=64)
    assert {f["status"] for f in monitor.snapshot(now=1.0)["features"]} == {"insufficient"}
    feed(monitor, drifted[999:], start=1.0)
    statuses = [f["status"] for f in monitor.snapshot(now=1.0)["features"]]
    assert statuses[:3] == ["act", "act", "act"]
    assert statuses[3] == "insufficient"  # gappy: only 900 finite values, same distribution


def test_old_traffic_leaves_the_window_but_not_the_cumulative_view() -> None:
    monitor, _ = fitted(window_s=60.0)
    feed(monitor, reference(np.random.default_rng(16), 1200), start=0.0, batch=4)
    later = monitor.snapshot(now=61.0)
    assert [f["count"] for f in later["features"]] == [0, 0, 0, 0]
    assert {f["status"] for f in later["features"]} == {"insufficient"}
    assert later["latency"]["total"]["count"] == 0 and later["latency"]["total"]["p50"] is None
    cumulative = later["cumulative"]
    assert [f["count"] for f in cumulative["features"]] == [1200, 1200, 1200, 1080]
    assert cumulative["latency"]["total"]["count"] == 300
    json.dumps(later, allow_nan=False)


def test_without_reference_only_latency_is_monitored() -> None:
    monitor = VersionMonitor.fit(None, {})
    monitor.observe(np.ones((2, 3)), {"y": np.ones(2)}, 0.01, 0.005, now=5.0)
    monitor.observe(None, {}, 0.02, 0.004, now=6.0)
    snapshot = monitor.snapshot(now=6.0)
    assert snapshot["features"] == [] and snapshot["outputs"] == []
    assert snapshot["cumulative"]["features"] == []
    assert snapshot["latency"]["model"]["count"] == 2
    histograms = monitor.cumulative_latency()
    assert histograms["total"].buckets([0.015, float("inf")]).tolist() == [1, 2]
    assert histograms["model"].sum == pytest.approx(0.009)


def test_outputs_without_features_and_missing_outputs() -> None:
    monitor, x = fitted()
    outputs = model(x[:5])
    monitor.observe(None, {"label": outputs["label"]}, 1e-3, 1e-3, now=0.0)
    snapshot = monitor.snapshot(now=0.0)
    assert [f["count"] for f in snapshot["features"]] == [0, 0, 0, 0]
    assert [o["count"] for o in snapshot["outputs"]] == [5, 0, 0]


@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.float64])
def test_other_numeric_dtypes_are_counted(dtype: type) -> None:
    reference: np.ndarray = np.arange(60.0).reshape(30, 2).astype(dtype)
    monitor = VersionMonitor.fit(reference, {"y": np.ones((30, 1, 1), dtype)})
    monitor.observe(np.ones((4, 2), dtype), {"y": np.ones((4, 1, 1), dtype)}, 1e-3, 1e-3, 0.0)
    snapshot = monitor.snapshot(now=0.0)
    assert [c["count"] for c in snapshot["features"] + snapshot["outputs"]] == [4, 4, 4]


def test_string_outputs_are_not_monitored() -> None:
    labels = np.array(["fraud", "ok", "ok"], dtype=object)
    monitor = VersionMonitor.fit(np.ones((3, 2)), {"label": labels, "score": np.ones(3)})
    monitor.observe(np.ones((1, 2)), {"label": labels[:1], "score": np.ones(1)}, 1e-3, 1e-3, 0.0)
    assert [o["name"] for o in monitor.snapshot(now=0.0)["outputs"]] == ["score"]


def test_a_request_of_the_wrong_width_is_skipped_and_counted_alone() -> None:
    monitor, x = fitted()
    clean, _ = fitted()
    for m in (monitor, clean):
        m.observe(x[:3], model(x[:3]), 1e-3, 1e-3, now=0.0)
        if m is monitor:
            monitor.observe(np.ones((1, 5)), {}, 1e-3, 1e-3, now=0.0)  # 5 features, not 4
            monitor.observe(None, {"label": np.ones((2, 3))}, 1e-3, 1e-3, now=0.0)  # 3 columns
        m.observe(x[3:5], model(x[3:5]), 1e-3, 1e-3, now=0.0)
    assert monitor.snapshot(now=0.0) == clean.snapshot(now=0.0)  # reads flush the buffer
    assert (monitor.skipped, clean.skipped) == (2, 0)
    assert monitor.snapshot(now=0.0)["latency"]["total"]["count"] == 2


def test_a_reference_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ValueError, match="rows, features"):
        VersionMonitor.fit(np.ones(3), {})
