"""Inline monitors through a real gateway: the drift endpoint and /metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.demo import sample_inputs
from monitors import psi
from tests.support.load import metric_sum
from tests.support.models import write_any_width_scorer
from tests.support.server import ADMIN, GatewayServer, InProcessServer


def post_rows(
    server: GatewayServer, x: np.ndarray, path: str = "/v2/models/fraud/versions/1/infer"
) -> None:
    with httpx.Client(base_url=server.url) as client:
        for i in range(0, len(x), 200):
            b = x[i : i + 200]
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(b.shape),
                        "datatype": "FP32",
                        "data": b.ravel().tolist(),
                    }
                ]
            }
            assert client.post(path, content=orjson.dumps(body)).status_code == 200


@pytest.fixture(scope="module")
def drifted(demo_repo: Path) -> Any:
    """A gateway whose fraud v1 saw 1500 rows with features 0 and 5 shifted, v2 1500 clean rows."""
    with InProcessServer(demo_repo) as server:
        x = sample_inputs("fraud", 1500, seed=21)["input"]
        shifted = x.copy()
        shifted[:, [0, 5]] += 4 * x[:, [0, 5]].std(axis=0)
        post_rows(server, shifted)
        post_rows(server, x, "/v2/models/fraud/versions/2/infer")
        yield server, shifted


def test_drift_endpoint_flags_exactly_the_shifted_features(drifted: Any, demo_repo: Path) -> None:
    server, shifted = drifted
    report = httpx.get(server.url + "/v2/models/fraud/versions/1/drift").json()
    assert (report["model"], report["version"], report["window_s"]) == ("fraud", "1", 300)
    statuses = {f["index"]: f["status"] for f in report["features"]}
    assert {i for i, s in statuses.items() if s == "act"} == {0, 5}
    assert all(s == "stable" for i, s in statuses.items() if i not in (0, 5)), statuses
    first = report["features"][0]
    for key in (
        "index",
        "name",
        "psi",
        "status",
        "p_value",
        "out_of_range",
        "missing",
        "edges",
        "reference",
        "current",
    ):
        assert key in first, key
    # The gateway's PSI is the offline API's PSI on the same data.
    reference = np.load(demo_repo / "fraud" / "1" / "reference.npy")
    assert first["psi"] == pytest.approx(psi(reference[:, 0], shifted[:, 0]), rel=1e-9)
    assert report["cumulative"]["features"][0]["count"] == 1500
    assert report["outputs"][0]["name"] == "probability"
    assert report["latency"]["total"]["count"] == 8 and report["latency"]["model"]["p50"] > 0
    clean = httpx.get(server.url + "/v2/models/fraud/versions/2/drift").json()
    assert {f["status"] for f in clean["features"]} == {"stable"}


def test_metrics_export_counts_latency_drift_and_artifacts(drifted: Any, demo_repo: Path) -> None:
    server, _ = drifted
    bad = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=b"{}")
    assert bad.status_code == 400
    text = httpx.get(server.url + "/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert (
        samples['turnout_requests_total{code="200",model="fraud",role="pinned",version="1"}'] == 8
    )
    assert (
        samples['turnout_requests_total{code="400",model="fraud",role="pinned",version="1"}'] == 1
    )
    assert samples['turnout_request_duration_seconds_count{model="fraud",version="1"}'] == 8
    assert (
        samples['turnout_request_duration_seconds_bucket{le="+Inf",model="fraud",version="1"}'] == 8
    )
    assert samples['turnout_feature_drift_status{feature="f0",model="fraud",version="1"}'] == 3
    assert samples['turnout_feature_drift_status{feature="f1",model="fraud",version="1"}'] == 1
    sha = hashlib.sha256((demo_repo / "fraud/1/model.onnx").read_bytes()).hexdigest()
    assert samples[f'turnout_model_info{{model="fraud",sha256="{sha}",version="1"}}'] == 1


def test_unknown_version_drift_is_404(drifted: Any) -> None:
    server, _ = drifted
    assert httpx.get(server.url + "/v2/models/fraud/versions/8/drift").status_code == 404


def test_monitors_off_serves_the_same_answers_and_measures_nothing(demo_repo: Path) -> None:
    rows = sample_inputs("fraud", 40, seed=3)["input"]
    tensor = {"name": "input", "shape": [40, 32], "datatype": "FP32", "data": rows.ravel().tolist()}
    body = orjson.dumps({"inputs": [tensor]})
    answers = []
    for args in ([], ["--no-monitors"]):
        with InProcessServer(demo_repo, args=args) as server:
            r = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=body)
            assert r.status_code == 200
            answers.append(r.json()["outputs"])
            drift = httpx.get(server.url + "/v2/models/fraud/versions/1/drift")
            text = httpx.get(server.url + "/metrics").text
            guarded = {
                "strategy": "canary",
                "baseline": "1",
                "candidate": "2",
                "weight": 0.1,
                "guards": {"max_psi": 0.25},
            }
            put = httpx.put(
                server.url + "/admin/routes/fraud",
                headers=ADMIN,
                json={"policy": guarded, "reason": "monitors off?"},
            )
    # the second loop ran with monitors off
    assert answers[0] == answers[1]
    assert drift.status_code == 404 and "monitors off" in drift.json()["error"]
    assert 'turnout_requests_total{code="200",model="fraud",role="pinned",version="1"} 1.0' in text
    assert "turnout_request_duration_seconds_count{" not in text  # declared, no samples
    assert "turnout_feature_psi{" not in text
    assert put.status_code == 400 and "guards.max_psi" in put.json()["error"]


def test_requests_the_monitor_cannot_count_are_exported(tmp_path: Path) -> None:
    """A model with a dynamic feature axis and an 8-column reference: 16-column requests are
    served but skipped by the monitor, and /metrics says how many."""
    folder = tmp_path / "anywidth" / "1"
    write_any_width_scorer(folder)
    reference = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
    np.save(folder / "reference.npy", reference)
    with InProcessServer(tmp_path) as server:
        path = "/v2/models/anywidth/versions/1/infer"
        post_rows(server, reference[:5], path)  # counted
        post_rows(server, np.ones((1, 16), np.float32), path)  # three requests, skipped
        post_rows(server, np.ones((2, 16), np.float32), path)
        post_rows(server, np.ones((1, 16), np.float32), path)
        assert metric_sum(server.url, "turnout_monitor_skipped_total", model="anywidth") == 3
        # the latency histogram counts only the requests the monitor could take
        count = "turnout_request_duration_seconds_count"
        assert metric_sum(server.url, count, model="anywidth") == 1
