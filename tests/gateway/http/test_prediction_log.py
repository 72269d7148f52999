"""The prediction log seen from outside: real gateways, real requests, the records they leave in
a directory or at a real HTTP sink, the metrics, and the settings that turn it on."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.cli import serve_settings
from gateway.settings import Settings, SettingsError
from tests.support.event_sink import EventSink
from tests.support.server import ADMIN, InProcessServer, until

KEY = {"X-API-Key": "alpha-key-0123"}
FRAUD = "/v2/models/fraud/infer"


def body(row: np.ndarray, inference_id: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                    "data": row.tolist()}]
    }  # fmt: skip
    if inference_id is not None:
        doc["id"] = inference_id
    return doc


def records(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(directory.glob("predictions-*.jsonl.gz"))
        for line in gzip.decompress(path.read_bytes()).splitlines()
    ]


def metric(server: InProcessServer, series: str) -> float:
    """The value of one series (name and labels as /metrics writes them); 0 when absent."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


SECRET = "prediction-log-secret-0123"


@pytest.fixture
def receiver() -> Iterator[EventSink]:
    with EventSink(SECRET) as server:  # checks every batch's signature
        yield server


def test_records_of_routed_requests_are_complete_and_exact(demo_repo: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    args = ["--prediction-log-sample", "fraud=1,*=0", "--prediction-log-dir", str(log_dir),
            "--api-key", "alpha=alpha-key-0123"]  # fmt: skip
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((40, 32)).astype(np.float32)
    answers = {}
    with InProcessServer(demo_repo, args=args) as gateway:
        policy = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25}
        put = httpx.put(
            gateway.url + "/admin/routes/fraud",
            json={"policy": policy, "reason": "test"},
            headers=ADMIN,
        )
        revision = put.json()["revision"]
        with httpx.Client(base_url=gateway.url, headers=KEY) as client:
            for i, row in enumerate(rows):
                r = client.post(FRAUD, json=body(row, f"order-{i}" if i % 2 else None))
                assert r.status_code == 200
                answers[r.json()["id"]] = (row, r.json())
        until(lambda: metric(gateway, 'turnout_predictions_logged_total{model="fraud"}') == 40)
    logged = records(log_dir)
    assert sorted(r["id"] for r in logged) == sorted(answers)
    for record in logged:
        row, answer = answers[record["id"]]
        version = answer["model_version"]
        assert record["model"] == "fraud" and record["version"] == version
        assert record["policy_revision"] == revision
        assert record["route_role"] == {"1": "baseline", "2": "candidate"}[version]
        assert record["propensity"] == {"1": 0.75, "2": 0.25}[version]
        assert record["principal"] == "alpha"
        (tensor,) = record["inputs"]
        assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("input", "FP32", [1, 32])
        np.testing.assert_array_equal(np.array(tensor["data"], np.float32), row)
        assert [{k: t[k] for k in ("name", "datatype", "shape")} for t in record["outputs"]] == [
            {k: t[k] for k in ("name", "datatype", "shape")} for t in answer["outputs"]
        ]
        for mine, theirs in zip(record["outputs"], answer["outputs"], strict=True):
            np.testing.assert_array_equal(
                np.array(mine["data"], np.float32), np.array(theirs["data"], np.float32)
            )


def test_no_request_waits_for_a_blocked_sink_and_the_overflow_is_counted(
    demo_repo: Path, receiver: EventSink
) -> None:
    receiver.release.clear()  # the sink takes the first batch and answers nothing
    args = ["--prediction-log-sample", "*=1", "--prediction-log-url", receiver.url,
            "--prediction-log-queue", "10"]  # fmt: skip
    row = np.zeros(32, np.float32)
    with (
        InProcessServer(
            demo_repo, args=args, env={"TURNOUT_PREDICTION_LOG_SECRET": SECRET}
        ) as gateway,
        httpx.Client(base_url=gateway.url, timeout=10) as client,
    ):
        assert client.post(FRAUD, json=body(row)).status_code == 200
        assert receiver.arrived.wait(10)  # the writer is blocked inside its POST
        # Every request is answered while the sink still holds the first batch.
        assert [client.post(FRAUD, json=body(row)).status_code for _ in range(100)] == [200] * 100
        assert not receiver.bodies
        dropped = 'turnout_predictions_dropped_total{model="fraud",reason="queue_full"}'
        assert metric(gateway, dropped) == 90
        assert metric(gateway, "turnout_prediction_log_queue_records") == 10
        receiver.release.set()
        until(lambda: metric(gateway, 'turnout_predictions_logged_total{model="fraud"}') == 11)
    events = receiver.taken()
    assert (
        not receiver.bad
        and len(events) == 11
        and {e["type"] for e in events} == {"dev.turnout.prediction"}
    )


def test_the_log_is_off_by_default(server: InProcessServer) -> None:
    assert httpx.post(server.url + FRAUD, json=body(np.zeros(32, np.float32))).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert "turnout_predictions" not in text and "turnout_prediction_log" not in text
    assert "turnout-predictions" not in {t.name for t in threading.enumerate()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prediction-log-sample", "fraud=0.1"], "PREDICTION_LOG_DIR or"),
        (["--prediction-log-sample", "fraud=1.5", "--prediction-log-dir", "x"], "MODEL=RATE"),
        (["--prediction-log-sample", "fraud", "--prediction-log-dir", "x"], "MODEL=RATE"),
        (["--prediction-log-sample", "a=1,a=0", "--prediction-log-dir", "x"], "given twice"),
        (["--prediction-log-dir", "x", "--prediction-log-url", "http://h/"], "one sink only"),
        (["--prediction-log-url", "ftp://h/"], "http(s) URL"),
        (["--prediction-log-dir", "x", "--prediction-log-retain-bytes", "10"], "RETAIN_BYTES"),
        (["--prediction-log-queue", "0"], "PREDICTION_LOG_QUEUE"),
        (["--prediction-log-url", "http://h/", "secret=short"], "PREDICTION_LOG_SECRET"),
        (["--prediction-log-dir", "x", "secret=" + "s" * 16], "PREDICTION_LOG_SECRET"),
    ],
    ids=[
        "no-sink",
        "rate-above-one",
        "no-rate",
        "twice",
        "two-sinks",
        "url",
        "retain",
        "queue",
        "short-secret",
        "secret-without-url",
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    tmp_path: Path, args: list[str], message: str
) -> None:
    secret = [a.removeprefix("secret=") for a in args if a.startswith("secret=")]
    env = {"TURNOUT_PREDICTION_LOG_SECRET": secret[0]} if secret else {}
    argv = [a for a in args if not a.startswith("secret=")]
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        serve_settings(["--model-repository", str(tmp_path), *argv], env)


def test_sampling_rates_survive_the_trip_to_worker_processes(tmp_path: Path) -> None:
    argv = ["--model-repository", str(tmp_path), "--prediction-log-sample", "fraud=0.1, *=1",
            "--prediction-log-dir", str(tmp_path / "log")]  # fmt: skip
    settings = serve_settings(argv, {})
    assert settings.prediction_log_sample == {"fraud": 0.1, "*": 1.0}
    assert Settings.from_env(settings.to_env()) == settings
