"""Feedback through a real gateway: ids capped where they enter, one reward per inference id,
rewards in range, the join's bound in /metrics, and 503 when Redis cannot take a reward."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, InProcessServer

ROW = sample_inputs("fraud", 1, seed=1)["input"].ravel().tolist()
AB = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(demo_repo, args=["--feedback-max-entries", "10"]) as s:
        put = {"policy": AB, "reason": "feedback tests"}
        assert httpx.put(s.url + "/admin/routes/fraud", json=put, headers=ADMIN).is_success
        yield s


def infer(server: InProcessServer, request_id: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}]
    }
    if request_id is not None:
        body["id"] = request_id
    return httpx.post(server.url + "/v2/models/fraud/infer", content=orjson.dumps(body))


def feedback(server: InProcessServer, request_id: str, reward: Any) -> httpx.Response:
    return httpx.post(
        server.url + "/v2/models/fraud/feedback", json={"id": request_id, "reward": reward}
    )


def metric(server: InProcessServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_an_inference_id_longer_than_400_characters_is_refused(gateway: InProcessServer) -> None:
    held = metric(gateway, "turnout_feedback_join_bytes")
    for _ in range(20):  # 50 KB ids: each was kept for the feedback window (96 MiB per 2,000)
        r = infer(gateway, "x" * 51_200)
        assert r.status_code == 400 and r.json() == {
            "error": '"id" must be at most 400 characters, got 51200'
        }
    assert metric(gateway, "turnout_feedback_join_bytes") <= held
    longest = infer(gateway, "y" * 400)
    assert longest.status_code == 200 and longest.json()["id"] == "y" * 400
    assert feedback(gateway, "y" * 400, 1).status_code == 200
    refused = feedback(gateway, "y" * 401, 1)
    assert refused.status_code == 400 and refused.json()["error"].startswith("id: at most 400")


def test_one_reward_per_inference_id(gateway: InProcessServer) -> None:
    answer = infer(gateway).json()
    first = feedback(gateway, answer["id"], 0.5)
    assert first.status_code == 200 and first.json()["duplicate"] is False
    again = feedback(gateway, answer["id"], 0.5)
    assert again.status_code == 200 and again.json() == {**first.json(), "duplicate": True}
    other = feedback(gateway, answer["id"], 1)
    assert other.status_code == 409
    assert other.json()["error"].startswith(f"reward: inference {answer['id']!r} already took")


@pytest.mark.parametrize("reward", [1e308, -1e308, -0.5, 1.5])
def test_a_reward_outside_the_policy_range_is_refused(
    gateway: InProcessServer, reward: float
) -> None:
    answer = infer(gateway).json()
    r = feedback(gateway, answer["id"], reward)
    assert r.status_code == 400 and r.json()["error"].startswith("reward: must be in [0.0, 1.0]")
    assert feedback(gateway, answer["id"], 1).json()["duplicate"] is False  # nothing was taken


def test_the_join_keeps_its_bound_and_says_so_in_metrics(gateway: InProcessServer) -> None:
    before = metric(gateway, 'turnout_feedback_evictions_total{reason="entries"}')
    ids = [infer(gateway).json()["id"] for _ in range(15)]
    assert metric(gateway, "turnout_feedback_join_entries") == 10
    assert metric(gateway, 'turnout_feedback_evictions_total{reason="entries"}') >= before + 5
    assert feedback(gateway, ids[0], 1).status_code == 404  # evicted: the oldest went first
    assert feedback(gateway, ids[-1], 1).status_code == 200


def test_feedback_answers_503_while_redis_is_down(demo_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo, root)
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with InProcessServer(root, args=["--redis-url", redis.url]) as s:
            put = {"policy": AB, "reason": "outage"}
            assert httpx.put(s.url + "/admin/routes/fraud", json=put, headers=ADMIN).is_success
            answer = infer(s).json()
            redis.stop()
            r = feedback(s, answer["id"], 1)
            assert r.status_code == 503 and "unavailable" in r.json()["error"]
    finally:
        redis.stop()
