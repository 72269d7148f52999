"""Outcomes and quality through real gateways: labels joined to the predictions served with an
id, every result counted and reported per batch (accepted, duplicate, conflict, unknown,
expired, invalid), batch caps, hostile ids and labels, what is not recorded (no id, pinned),
the quality endpoint and metrics, and two replicas on Redis sharing one join."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.support.server import ADMIN, GatewayServer, InProcessServer, Server, until

REDIS_URL = "redis://127.0.0.1:6379/0"
ROWS = sample_inputs("fraud", 400, seed=11)["input"]


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(demo_repo) as s:
        yield s


def infer(
    server: GatewayServer, row: int, request_id: str | None, path: str = "/v2/models/fraud/infer"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROWS[row].tolist()}
        ]
    }
    if request_id is not None:
        body["id"] = request_id
    r = httpx.post(server.url + path, content=orjson.dumps(body))
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def score(answer: dict[str, Any]) -> float:
    (output,) = answer["outputs"]
    return float(output["data"][0])


def post(server: GatewayServer, outcomes: Any, model: str = "fraud") -> httpx.Response:
    return httpx.post(
        server.url + f"/v2/models/{model}/outcomes",
        content=orjson.dumps({"outcomes": outcomes}),
        timeout=30.0,
    )


def quality(server: GatewayServer, version: str, **params: str) -> dict[str, Any]:
    r = httpx.get(server.url + f"/v2/models/fraud/versions/{version}/quality", params=params)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def fresh(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def test_labels_join_the_predictions_and_every_result_is_reported(
    gateway: InProcessServer,
) -> None:
    before = quality(gateway, "2", window="all")["labels"]
    ids = [fresh("join") for _ in range(40)]
    scores = [score(infer(gateway, i, request_id)) for i, request_id in enumerate(ids)]
    # the label is the model's own decision for the first 30, the opposite for the last 10
    labels = [int(s >= 0.5) if i < 30 else int(s < 0.5) for i, s in enumerate(scores)]
    batch = [{"id": i, "label": y} for i, y in zip(ids, labels, strict=True)]
    unknown = fresh("never-served")
    r = post(gateway, [*batch, {"id": unknown, "label": 1}])
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "fraud", "accepted": 40, "duplicate": 0, "conflict": 0, "unknown": 1,
        "expired": 0, "invalid": 0, "ids": {"unknown": [unknown]},
    }  # fmt: skip
    after = quality(gateway, "2", window="all")
    assert after["labels"] == before + 40
    assert after["task"] == {"type": "binary", "output": "probability", "threshold": 0.5}
    assert set(after["realized"]) >= {"accuracy", "precision", "recall", "roc_auc", "brier"}
    assert set(after["estimated"]) >= {"accuracy", "recall", "roc_auc"}
    assert after["join"]["accepted"] >= 40 and after["join"]["unknown"] >= 1
    assert after["served"] >= 40


def test_one_label_per_id_duplicates_and_conflicts(gateway: InProcessServer) -> None:
    a, b = fresh("dup"), fresh("dup")
    infer(gateway, 1, a)
    infer(gateway, 2, b)
    assert post(gateway, [{"id": a, "label": 1}, {"id": b, "label": 0}]).json()["accepted"] == 2
    labels = quality(gateway, "2", window="all")["labels"]
    again = post(gateway, [{"id": a, "label": 1}, {"id": b, "label": True}])
    assert again.status_code == 200
    assert again.json() | {"ids": None} == {
        "model": "fraud", "accepted": 0, "duplicate": 1, "conflict": 1, "unknown": 0,
        "expired": 0, "invalid": 0, "ids": None,
    }  # fmt: skip
    assert again.json()["ids"] == {"conflict": [b]}
    # nothing changed: the same labels are counted once
    assert quality(gateway, "2", window="all")["labels"] == labels
    # a batch of nothing but conflicts is a 409, with the same report
    only = post(gateway, [{"id": b, "label": 1}])
    assert only.status_code == 409 and only.json()["conflict"] == 1


def test_requests_without_an_id_or_pinned_are_not_recorded(gateway: InProcessServer) -> None:
    pinned = fresh("pinned")
    infer(gateway, 3, pinned, path="/v2/models/fraud/versions/2/infer")
    generated = infer(gateway, 4, None)["id"]  # the gateway's own id: never recorded
    r = post(gateway, [{"id": pinned, "label": 1}, {"id": generated, "label": 1}])
    assert r.json()["unknown"] == 2 and r.json()["accepted"] == 0


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"id": "a", "label": 2}, "label of id 'a': a binary label is 0, 1, true or false, got 2"),
        ({"id": "a", "label": 1e308}, "label of id 'a': a binary label"),
        ({"id": "a", "label": "1"}, "label of id 'a': a binary label"),
        ({"id": "a", "label": None}, "label of id 'a': a binary label"),
        ({"id": "a", "label": [1]}, "label of id 'a': a binary label"),
        ({"id": "a"}, "label: required for id 'a'"),
        ({"id": "", "label": 1}, "id: required"),
        ({"id": 12, "label": 1}, "id: required"),
        ({"id": "x" * 401, "label": 1}, "id: at most 400 characters, got 401"),
        ({"id": "x" * 100_000, "label": 1}, "id: at most 400 characters, got 100000"),
        (["a", 1], "an outcome is an object"),
        (None, "an outcome is an object"),
    ],
)
def test_hostile_ids_and_labels_are_invalid_never_recorded(
    gateway: InProcessServer, item: Any, error: str
) -> None:
    good = fresh("good")
    infer(gateway, 5, good)
    r = post(gateway, [item, {"id": good, "label": 0}])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["invalid"] == 1 and answer["accepted"] == 1
    (reported,) = answer["ids"]["invalid"]
    assert reported["index"] == 0 and reported["error"].startswith(error)
    assert len(r.content) < 2000  # a hostile value is never echoed whole


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b'{"outcomes": [{"id": "a", "label": NaN}]}', 400, "malformed JSON body"),
        (b"[1, 2]", 400, "request body must be a JSON object"),
        (b'{"outcomes": {"id": "a"}}', 400, 'outcomes: required, a list of {"id": ...'),
        (b'{"outcomes": []}', 400, "outcomes: must not be empty"),
        (b"{}", 400, "outcomes: required"),
        (orjson.dumps({"outcomes": [{"id": "a", "label": 1}] * 10_001}), 413,
         "outcomes: at most 10000 in one batch, got 10001; send several"),
        (b"[" * 9_000_000, 413, ""),
    ],
)  # fmt: skip
def test_malformed_and_oversized_batches_are_refused_whole(
    gateway: InProcessServer, body: bytes, status: int, error: str
) -> None:
    r = httpx.post(gateway.url + "/v2/models/fraud/outcomes", content=body, timeout=30.0)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(error)


def test_a_full_batch_of_ten_thousand_is_taken(gateway: InProcessServer) -> None:
    ids = [fresh("bulk") for _ in range(20)]
    for i, request_id in enumerate(ids):
        infer(gateway, 100 + i, request_id)
    batch = [{"id": f"unknown-{i:05d}-" + "u" * 380, "label": 1} for i in range(9_980)]
    batch += [{"id": request_id, "label": 1} for request_id in ids]
    r = post(gateway, batch)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["accepted"], answer["unknown"]) == (20, 9_980)
    assert len(answer["ids"]["unknown"]) == 5  # the first few


def test_a_model_without_a_task_or_unknown_is_refused(gateway: InProcessServer) -> None:
    r = post(gateway, [{"id": "a", "label": 1}], model="echo")
    assert r.status_code == 400 and "declares no task" in r.json()["error"]
    r = post(gateway, [{"id": "a", "label": 1}], model="nope")
    assert r.status_code == 404
    q = httpx.get(gateway.url + "/v2/models/echo/versions/1/quality")
    assert q.status_code == 404 and "declares no task" in q.json()["error"]
    for params, field in (({"window": "week"}, "window"), ({"scope": "planet"}, "scope")):
        q = httpx.get(gateway.url + "/v2/models/fraud/versions/1/quality", params=params)
        assert q.status_code == 400 and q.json()["error"].startswith(field)


def test_quality_metrics_are_exported_for_loaded_versions(gateway: InProcessServer) -> None:
    request_id = fresh("metrics")
    infer(gateway, 7, request_id)
    post(gateway, [{"id": request_id, "label": 1}])
    text = httpx.get(gateway.url + "/metrics").text
    assert 'turnout_quality_labels{model="fraud",version="2"}' in text
    assert 'turnout_quality_lower_bound{metric="accuracy",model="fraud",version="2"}' in text
    assert 'turnout_quality_estimated{metric="roc_auc",model="fraud",version="2"}' in text
    assert 'turnout_outcomes_total{model="fraud",result="accepted"}' in text
    assert "turnout_outcome_join_entries " in text
    assert 'turnout_outcome_join_evictions_total{reason="bytes"}' in text
    # no series for a model or version outside the registry, nor for a version without a task
    assert 'model="echo"' not in "\n".join(
        line for line in text.splitlines() if line.startswith("turnout_quality")
    )


def test_outcomes_take_feedback_keys(demo_repo: Path) -> None:
    args = ["--api-key", "app=api-key-0123456789", "--feedback-key", "labeller=fb-key-0123456789"]
    with InProcessServer(demo_repo, args=args) as s:
        url = s.url + "/v2/models/fraud/outcomes"
        body = orjson.dumps({"outcomes": [{"id": "a", "label": 1}]})
        assert httpx.post(url, content=body).status_code == 401
        api = {"X-API-Key": "api-key-0123456789"}
        assert httpx.post(url, content=body, headers=api).status_code == 401
        ok = httpx.post(url, content=body, headers={"X-API-Key": "fb-key-0123456789"})
        assert ok.status_code == 200 and ok.json()["unknown"] == 1
        report = s.url + "/v2/models/fraud/versions/1/quality"
        assert httpx.get(report).status_code == 401
        assert httpx.get(report, headers=api).status_code == 200


def test_the_in_process_join_is_bounded(demo_repo: Path) -> None:
    with InProcessServer(demo_repo, args=["--outcome-max-entries", "10"]) as s:
        ids = [fresh("bounded") for _ in range(25)]
        for i, request_id in enumerate(ids):
            infer(s, i, request_id)
        r = post(s, [{"id": i, "label": 1} for i in ids])
        answer = r.json()
        assert (answer["accepted"], answer["unknown"]) == (10, 15)
        assert answer["ids"]["unknown"] == ids[:5]  # the oldest went first
        text = httpx.get(s.url + "/metrics").text
        assert 'turnout_outcome_join_evictions_total{reason="entries"} 15.0' in text
        assert "turnout_outcome_join_entries 10.0" in text


def test_two_replicas_on_redis_share_the_join_and_the_figures(
    demo_repo: Path, tmp_path: Path, prefix: str
) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    args = ["--redis-url", REDIS_URL, "--redis-prefix", prefix]
    # processes: the fleet's views tell members apart by process id
    with Server(root, args=args) as a, Server(root, args=args) as b:
        ids = [fresh("fleet") for _ in range(30)]
        scores = [score(infer(a, i, request_id)) for i, request_id in enumerate(ids)]
        labels = [int(s >= 0.5) for s in scores]  # the model is always right
        # joinable elsewhere once A's flush (every flush_s) has sent them to Redis
        flushed = "turnout_outcome_predictions_pending 0.0"
        until(lambda: flushed in httpx.get(a.url + "/metrics").text)
        # served by A, posted to B: joined through Redis
        r = post(b, [{"id": i, "label": y} for i, y in zip(ids, labels, strict=True)])
        assert r.status_code == 200 and r.json()["accepted"] == 30, r.text
        # posted again to A: duplicates, fleet-wide
        assert post(a, [{"id": ids[0], "label": labels[0]}]).json()["duplicate"] == 1
        # visible on both: B holds the labels, A the served scores; each merges the other's
        for server in (a, b):

            def merged(s: GatewayServer = server) -> bool:
                return bool(quality(s, "2", scope="fleet")["labels"] == 30)

            until(merged)
            fleet = quality(server, "2", scope="fleet")
            assert fleet["processes"] == 2
            assert fleet["realized"]["accuracy"]["value"] == 1.0
            assert fleet["served"] >= 30
        assert quality(a, "2", scope="process")["labels"] == 0
        assert quality(b, "2", scope="process")["labels"] == 30
        np.testing.assert_allclose(
            quality(b, "2", scope="fleet")["realized"]["brier"]["value"],
            np.mean([(s - y) ** 2 for s, y in zip(scores, labels, strict=True)]),
            rtol=1e-5,
        )


def test_multiclass_and_regression_tasks(demo_repo: Path, tmp_path: Path) -> None:
    """The demo's risk model twice: v1 judged as a 2-class model on its logits (labels by
    class name), v2 as a regression of its score (targets = score + 0.1)."""
    root = tmp_path / "models"
    for version, task in (
        ("1", {"type": "multiclass", "output": "logits", "classes": ["low", "high"]}),
        ("2", {"type": "regression", "output": "score"}),
    ):
        shutil.copytree(demo_repo / "risk" / "1", root / "risk" / version)
        path = root / "risk" / version / "metadata.json"
        path.write_text(orjson.dumps({**orjson.loads(path.read_bytes()), "task": task}).decode())
    rows = sample_inputs("risk", 30, seed=4)
    with InProcessServer(root) as s:
        outcomes: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        for i in range(30):
            version = "1" if i % 2 else "2"
            request_id = fresh("risk")
            inputs = [
                {"name": "features", "shape": [1, 8], "datatype": "FP32",
                 "data": rows["features"][i].tolist()},
                {"name": "segment", "shape": [1, 1], "datatype": "INT64",
                 "data": rows["segment"][i].tolist()},
                {"name": "flags", "shape": [1, 4], "datatype": "BOOL",
                 "data": rows["flags"][i].tolist()},
            ]  # fmt: skip
            body = {"id": request_id, "inputs": inputs}
            put = httpx.put(
                s.url + "/admin/routes/risk",
                json={"policy": {"strategy": "single", "version": version}, "reason": "test"},
                headers=ADMIN,
            )
            assert put.status_code == 200, put.text
            answer = httpx.post(s.url + "/v2/models/risk/infer", content=orjson.dumps(body))
            assert answer.status_code == 200, answer.text
            out = {o["name"]: o["data"] for o in answer.json()["outputs"]}
            if version == "1":
                name = "high" if out["logits"][1] > out["logits"][0] else "low"
                outcomes["1"].append({"id": request_id, "label": name})
            else:
                outcomes["2"].append({"id": request_id, "label": out["score"][0] + 0.1})
        # labels checked by the newest version's task (regression): a class name is invalid
        refused = post(s, outcomes["1"][:1], model="risk").json()
        assert refused["invalid"] == 1
        # ... so the multiclass version takes indices, which both tasks accept
        by_index = [{"id": o["id"], "label": int(o["label"] == "high")} for o in outcomes["1"]]
        assert post(s, by_index, model="risk").json()["accepted"] == 15
        assert post(s, outcomes["2"], model="risk").json()["accepted"] == 15
        multi = httpx.get(s.url + "/v2/models/risk/versions/1/quality").json()
        assert multi["realized"]["accuracy"]["value"] == 1.0 and multi["labels"] == 15
        assert set(multi["per_class"]) == {"low", "high"}
        assert sum(multi["label_counts"].values()) == 15
        regression = httpx.get(s.url + "/v2/models/risk/versions/2/quality").json()
        assert regression["labels"] == 15
        mae = regression["realized"]["mae"]["value"]
        assert abs(mae - 0.1) < 1e-6 and regression["realized"]["bias"]["value"] < 0


def unshaped(server: GatewayServer) -> float:
    text = httpx.get(server.url + "/metrics").text
    (line,) = (x for x in text.splitlines() if x.startswith("turnout_quality_unshaped_responses"))
    return float(line.split()[-1])


def test_a_response_without_the_task_output_is_counted_not_remembered(
    demo_repo: Path, tmp_path: Path
) -> None:
    """The request path keeps every routed response of a version with a task; the flush finds
    that one without the task's output (the client asked for another) has no prediction: it is
    counted as unshaped, and its id is unknown to the outcomes."""
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "risk" / "1", root / "risk" / "1")
    path = root / "risk" / "1" / "metadata.json"
    task = {"type": "regression", "output": "score"}
    path.write_text(orjson.dumps({**orjson.loads(path.read_bytes()), "task": task}).decode())
    rows = sample_inputs("risk", 2, seed=5)
    inputs = [
        {"name": "features", "shape": [1, 8], "datatype": "FP32",
         "data": rows["features"][0].tolist()},
        {"name": "segment", "shape": [1, 1], "datatype": "INT64",
         "data": rows["segment"][0].tolist()},
        {"name": "flags", "shape": [1, 4], "datatype": "BOOL", "data": rows["flags"][0].tolist()},
    ]  # fmt: skip
    with InProcessServer(root) as s:
        before = unshaped(s)
        for request_id, outputs in (("logits-only", ["logits"]), ("with-score", ["score"])):
            body = {"id": request_id, "inputs": inputs, "outputs": [{"name": n} for n in outputs]}
            answer = httpx.post(s.url + "/v2/models/risk/infer", content=orjson.dumps(body))
            assert answer.status_code == 200, answer.text
        results = post(s, [{"id": "logits-only", "label": 0.5}, {"id": "with-score", "label": 0.5}],
                       model="risk").json()  # fmt: skip
        assert (results["unknown"], results["accepted"]) == (1, 1), results
        assert unshaped(s) == before + 1
