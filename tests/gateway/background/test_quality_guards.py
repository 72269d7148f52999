"""Quality guards through a real gateway: a canary whose candidate the labels show worse is
rolled back (audited as ``guard:min_quality.accuracy`` or
``guard:max_quality_drop_vs_baseline.accuracy``), one shown better is not, and nothing happens
before ``min_labels``. The quality events: breached once, recovered once."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.background.guards import GuardEvaluator
from gateway.background.quality import Quality
from gateway.background.shadow import ShadowRunner
from gateway.demo import sample_inputs
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic
from router.policy.guards import Check, Evaluation
from router.policy.spec import parse_policy
from router.state.outcomes import MemoryPredictions
from router.state.store import MemoryStore
from router.state.table import RouteTable
from tests.support.server import ADMIN, InProcessServer, until

ROWS = sample_inputs("fraud", 400, seed=5)["input"]
CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.5, "seed": 11}
MIN_LABELS = 40


def put_policy(server: InProcessServer, guards: dict[str, Any]) -> None:
    body = {"policy": {**CANARY, "guards": guards}, "reason": "quality guard test"}
    r = httpx.put(server.url + "/admin/routes/fraud", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text


def serve(server: InProcessServer, n: int) -> dict[str, list[tuple[str, float]]]:
    """``n`` routed requests with ids: per version, (id, score)."""
    served: dict[str, list[tuple[str, float]]] = {"1": [], "2": []}
    with httpx.Client(base_url=server.url) as client:
        for i in range(n):
            request_id = f"q-{uuid.uuid4().hex[:16]}"
            body = {
                "id": request_id,
                "inputs": [
                    {"name": "input", "shape": [1, 32], "datatype": "FP32",
                     "data": ROWS[i % len(ROWS)].tolist()}
                ],
            }  # fmt: skip
            r = client.post("/v2/models/fraud/infer", content=orjson.dumps(body))
            assert r.status_code == 200, r.text
            answer = r.json()
            served[answer["model_version"]].append((request_id, answer["outputs"][0]["data"][0]))
    return served


def labels(pairs: list[tuple[str, float]], right: bool) -> list[dict[str, Any]]:
    """The decision at 0.5 as the label (the version is right) or its opposite (wrong)."""
    return [{"id": i, "label": int((s >= 0.5) == right)} for i, s in pairs]


def post(server: InProcessServer, outcomes: list[dict[str, Any]]) -> None:
    r = httpx.post(server.url + "/v2/models/fraud/outcomes", json={"outcomes": outcomes})
    assert r.status_code == 200 and r.json()["accepted"] == len(outcomes), r.text


def policy(server: InProcessServer) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(server.url + "/admin/routes/fraud", headers=ADMIN).json()
    return answer


def guards_view(server: InProcessServer) -> dict[str, Any]:
    r = httpx.get(server.url + "/admin/routes/fraud/guards", headers=ADMIN)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def last_audit(server: InProcessServer) -> dict[str, Any]:
    r = httpx.get(server.url + "/admin/audit", params={"model": "fraud", "limit": 1}, headers=ADMIN)
    entry: dict[str, Any] = r.json()["entries"][0]
    return entry


@pytest.mark.parametrize(
    ("guards", "who"),
    [
        ({"min_quality": {"accuracy": 0.6}}, "guard:min_quality.accuracy"),
        ({"max_quality_drop_vs_baseline": {"accuracy": 0.2}},
         "guard:max_quality_drop_vs_baseline.accuracy"),
    ],
)  # fmt: skip
def test_a_worse_candidate_is_rolled_back_once_it_has_min_labels(
    demo_repo: Path, guards: dict[str, Any], who: str
) -> None:
    spec = {"interval_s": 0.5, "min_requests": 1, "min_labels": MIN_LABELS, **guards}
    with InProcessServer(demo_repo) as s:
        put_policy(s, spec)
        served = serve(s, 240)
        assert len(served["1"]) >= MIN_LABELS and len(served["2"]) >= MIN_LABELS
        post(s, labels(served["1"], right=True))
        # too few labels of the candidate: no verdict on it, whatever they say
        post(s, labels(served["2"][: MIN_LABELS - 1], right=False))
        view = guards_view(s)
        quality_checks = [c for c in view["checks"] if c["guard"] == who.removeprefix("guard:")]
        assert [c["status"] for c in quality_checks] == ["insufficient"]
        assert view["verdict"] == "insufficient"
        assert view["quality"]["2"]["labels"] == MIN_LABELS - 1
        assert policy(s)["policy"]["strategy"] == "canary"
        # the rest: the candidate is wrong on every label, and rolled back
        post(s, labels(served["2"][MIN_LABELS - 1 :], right=False))
        until(lambda: policy(s)["policy"]["strategy"] == "single", timeout_s=20)
        assert policy(s)["policy"]["version"] == "1"
        entry = last_audit(s)
        assert entry["who"] == who and entry["action"] == "rollback"
        evidence = entry["details"]["quality"]["2"]
        assert evidence["labels"] == len(served["2"])


def test_a_better_candidate_is_not_rolled_back(demo_repo: Path) -> None:
    spec = {
        "interval_s": 0.5,
        "min_requests": 1,
        "min_labels": MIN_LABELS,
        "min_quality": {"accuracy": 0.6},
        "max_quality_drop_vs_baseline": {"accuracy": 0.2},
        "advance_after_s": 0.5,
    }
    with InProcessServer(demo_repo) as s:
        put_policy(s, {**spec, "advance_after_s": 3600})
        served = serve(s, 240)
        post(s, labels(served["1"], right=False) [: len(served["1"]) // 2]
             + labels(served["1"], right=True)[len(served["1"]) // 2 :])  # fmt: skip
        post(s, labels(served["2"], right=True))
        until(lambda: guards_view(s)["verdict"] == "pass", timeout_s=20)
        view = guards_view(s)
        statuses = {c["guard"]: c["status"] for c in view["checks"] if c["version"] == "2"}
        assert statuses["min_quality.accuracy"] == "pass"
        assert statuses["max_quality_drop_vs_baseline.accuracy"] == "pass"
        assert policy(s)["policy"]["strategy"] == "canary"
        assert not any(
            e["who"].startswith("guard:")
            for e in httpx.get(
                s.url + "/admin/audit", params={"model": "fraud"}, headers=ADMIN
            ).json()["entries"]
        )


def test_quality_events_breached_and_recovered_once(tmp_path: Path) -> None:
    events: list[tuple[str, str, Mapping[str, Any]]] = []

    def emit(kind: str, subject: str, data: Mapping[str, Any]) -> None:
        events.append((kind, subject, dict(data)))

    quality = Quality(
        Registry(tmp_path, lambda *a: None),  # type: ignore[arg-type]
        MemoryPredictions(60.0, 10, 1 << 20),
        window_s=3600,
        emit=emit,
    )

    def verdict(status: str, bound: float) -> Evaluation:
        detail = {"value": 0.7, "labels": 100}
        check = Check("min_quality.recall", "2", status, bound, 0.6, detail)  # type: ignore[arg-type]
        return Evaluation("breach" if status == "breach" else "pass", (check,))

    quality.judged("fraud", verdict("pass", 0.65))  # healthy from the start: nothing to say
    quality.judged("fraud", verdict("breach", 0.55))
    quality.judged("fraud", verdict("breach", 0.52))  # still breached: said once
    quality.judged("fraud", verdict("pass", 0.63))
    assert events == [
        ("quality.breached", "fraud/2",
         {"metric": "recall", "value": 0.7, "bound": 0.55, "floor": 0.6}),
        ("quality.recovered", "fraud/2",
         {"metric": "recall", "value": 0.7, "bound": 0.63, "floor": 0.6}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("guards", "error"),
    [
        ({"min_quality": {"recal": 0.7}}, "policy.guards.min_quality.recal: unknown metric"),
        ({"min_quality": {"recall": 7}}, "policy.guards.min_quality.recall: must be in [0, 1]"),
        ({"max_quality_drop_vs_baseline": {"mae": -1}},
         "policy.guards.max_quality_drop_vs_baseline.mae: must be in [0, 1e+15]"),
        ({"min_labels": 0}, "policy.guards.min_labels: must be in [1, 1e9]"),
    ],
)  # fmt: skip
def test_the_admin_api_refuses_bad_quality_guards_naming_the_field(
    server: InProcessServer, guards: dict[str, Any], error: str
) -> None:
    before = httpx.get(server.url + "/admin/routes/fraud", headers=ADMIN)
    body = {"policy": {**CANARY, "guards": guards}, "reason": "bad quality guard"}
    r = httpx.put(server.url + "/admin/routes/fraud", json=body, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"].startswith(error), r.text
    after = httpx.get(server.url + "/admin/routes/fraud", headers=ADMIN)
    assert (after.status_code, after.content) == (before.status_code, before.content)


@pytest.mark.anyio
async def test_a_replica_without_the_lease_sees_the_quality_verdict(registry: Registry) -> None:
    """The rollout engine asks ``verdict`` on whichever replica holds its own lease: every
    replica reads the quality windows, leader or not."""
    store = MemoryStore()
    quality = Quality(registry, MemoryPredictions(3600.0, 1000, 1 << 20), window_s=3600)
    tables = [RouteTable(store), RouteTable(store)]
    shadows = ShadowRunner(registry, 8)
    spec = {"interval_s": 1, "min_requests": 1, "min_labels": 20, "on_breach": "alert",
            "min_quality": {"accuracy": 0.6}}  # fmt: skip
    try:
        doc = parse_policy({**CANARY, "guards": spec}, ["1", "2"])
        record = await tables[0].write("fraud", doc, expected=None, who="tester", action="put",
                                       reason="test", artifacts={"1": "a", "2": "b"})  # fmt: skip
        tables[1].install(record, "fraud")
        leader, follower = (
            GuardEvaluator(t, registry, shadows, Traffic(), GuardMetrics(), quality=quality)
            for t in tables
        )
        await leader.tick(100.0)
        await follower.tick(100.0)
        assert leader.metrics.leader and not follower.metrics.leader
        assert follower.verdict("fraud") == "insufficient"  # no labels yet
        info = registry.get("fraud", "2").info
        labels = []
        for i in range(30):  # the candidate is wrong every time
            request_id = f"v-{i}"
            score = 0.9 if i % 2 else 0.1
            quality.served(info, {"probability": np.array([[score]], np.float32)}, request_id)
            labels.append({"id": request_id, "label": int(score < 0.5)})
        answer, _ = await quality.take("fraud", {"outcomes": labels})
        assert answer["accepted"] == 30
        await leader.tick(101.5)
        await follower.tick(101.5)
        assert leader.verdict("fraud") == follower.verdict("fraud") == "breach"
    finally:
        await shadows.close()
