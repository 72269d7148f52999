"""The closed loop end to end (issue 15's done-when), on real processes: two gateway replicas
sharing a fresh Redis prefix, a real HTTP event sink with a secret, the demo's fraud v1.

1. an operator sets a rollout template with ``approval: required`` (operator role);
2. the world moves (the first feature shifts): one signed ``drift.changed`` for ``fraud/1/f0``
   reaches the sink, once for the fleet;
3. the "retraining pipeline" (this test, reacting to what the sink took) writes fraud v2, built
   by code, and loads it on both replicas: the template shadows it, then canaries it;
4. traffic with ids, labelled from a deterministic ground truth: v2 is wrong where the truth is
   right, so the quality guard rolls it back; the pipeline, told by ``rollout.rolled_back``,
   writes v3 (right): it passes the steps, waits for approval (``approval.requested`` at the
   sink), an operator approves it, it is promoted;
5. the audit trail and the event stream (``GET /admin/events`` and what the sink took) tell
   that story in order, naming each artifact's sha256.

Every wait polls an observable with a deadline, while traffic and labels keep flowing."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.demo import REFERENCE_ROWS, REFERENCE_SEED, sample_inputs
from tests.conftest import REDIS_URL
from tests.support.event_sink import EventSink
from tests.support.models import write_linear_fraud
from tests.support.server import ADMIN, Server, until

pytestmark = [pytest.mark.system, pytest.mark.closed_loop, pytest.mark.timeout(900)]

OPERATOR_TOKEN = "ops-operator-token-0123456789"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
SECRET = "closed-loop-sink-secret-0123456789"
DEADLINE_S = 180.0  # per stage: generous for a loaded 2-core CI machine; never a figure asserted
SHIFT = 4.0  # the first feature's move, in its own units (its reference sd is 0.5)
MIN_LABELS = 30
LOADS_APART_S = 3.0  # the pipeline's time between two replicas' loads: over the shadow phase
FLOOR = "min_quality.accuracy"  # v2's breaches: this floor and the drop; the floor is named
TEMPLATE = {
    "shadow_s": 1,
    "steps": [0.25, 0.5],
    "step_s": 1,
    "guards": {
        "interval_s": 0.5,
        "min_requests": 5,
        "max_error_ratio": 0.05,
        "min_labels": MIN_LABELS,
        # v1 is under this floor in the moved world (accuracy 0.5): the reason to retrain,
        # and no reason to hold its replacement in the shadow
        "min_quality": {"accuracy": 0.6},
        "max_quality_drop_vs_baseline": {"accuracy": 0.1},
    },
    "approval": "required",
}


@dataclass
class World:
    """The moved world: rows whose first feature shifted, and the ground truth that labels
    them (the sign of a fixed linear score of the standardised features, blind to the moved
    feature). The pipeline's models are that score (right) or its opposite (wrong)."""

    mean: np.ndarray
    std: np.ndarray
    truth_weights: np.ndarray
    rows: np.ndarray

    @classmethod
    def moved(cls, n: int = 4000) -> World:
        reference = sample_inputs("fraud", REFERENCE_ROWS, REFERENCE_SEED)["input"]
        weights = np.random.default_rng(15).standard_normal(32)
        weights[0] = 0.0
        rows = sample_inputs("fraud", n, seed=1515)["input"]
        rows[:, 0] += SHIFT
        return cls(reference.mean(axis=0), reference.std(axis=0), weights, rows)

    def label(self, row: np.ndarray) -> int:
        scaled = (row.astype(np.float64) - self.mean) / self.std
        return int(scaled @ self.truth_weights > 0)

    def retrain(self, folder: Path, right: bool) -> str:
        """A new version: the truth's score, sharpened (right) or reversed (wrong); its
        reference is the moved world's rows. The model's sha256."""
        weights = (4.0 if right else -4.0) * self.truth_weights
        return write_linear_fraud(folder, weights, self.mean, self.std, self.rows[:2000])


@dataclass
class Fleet:
    """The replicas, the sink, and the traffic: routed requests with ids, alternately to each
    replica, each labelled right away through the replica that served it (where it is joinable
    at once)."""

    replicas: list[Server]
    sink: EventSink
    world: World
    client: httpx.Client
    sent: int = 0
    served: Counter[str] = field(default_factory=Counter)

    def drive(self, n: int = 8) -> None:
        outcomes: list[list[dict[str, Any]]] = [[] for _ in self.replicas]
        for _ in range(n):
            row = self.world.rows[self.sent % len(self.world.rows)]
            to = self.sent % len(self.replicas)
            self.sent += 1
            request_id = f"tx-{self.sent}"
            body = {
                "id": request_id,
                "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32",
                            "data": row.tolist()}],
            }  # fmt: skip
            r = self.client.post(
                self.replicas[to].url + "/v2/models/fraud/infer", content=orjson.dumps(body)
            )
            assert r.status_code == 200, r.text
            self.served[r.json()["model_version"]] += 1
            outcomes[to].append({"id": request_id, "label": self.world.label(row)})
        for replica, batch in zip(self.replicas, outcomes, strict=True):
            url = replica.url + "/v2/models/fraud/outcomes"
            r = self.client.post(url, json={"outcomes": batch})
            assert r.status_code == 200 and r.json()["accepted"] == len(batch), r.text

    def driving(self, condition: Callable[[], object], what: str) -> Any:
        """Keep traffic and labels flowing until ``condition()`` is truthy (its value)."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {r.url}\n{r.log()[-3000:]}" for r in self.replicas)
                raise AssertionError(
                    f"not within {DEADLINE_S} s: {what}; served {self.served}\n{logs}"
                )
            self.drive()

    def get(self, path: str, replica: int = 0, **params: Any) -> Any:
        r = self.client.get(self.replicas[replica].url + path, params=params, headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    def serving(self, replica: int = 0) -> tuple[str, str] | None:
        r = self.client.get(self.replicas[replica].url + "/admin/routes/fraud", headers=ADMIN)
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        policy = r.json()["policy"]
        return policy["strategy"], policy.get("version", "")

    def rollout(self) -> dict[str, Any]:
        found: dict[str, Any] = self.get("/admin/routes/fraud/rollout").get("rollout") or {}
        return found

    def in_phase(self, version: str, phase: str) -> bool:
        rollout = self.rollout()
        return rollout.get("version") == version and rollout.get("phase") == phase

    def at_sink(self, kind: str, subject: str | None = None, **data: Any) -> dict[str, Any] | None:
        """The first event of ``kind`` (about ``subject``) the sink took whose data holds
        ``data``."""
        for event in self.sink.taken():
            if (
                event["type"] == f"dev.turnout.{kind}"
                and subject in (None, event["subject"])
                and data.items() <= event["data"].items()
            ):
                return event
        return None

    def load(self, version: str) -> None:
        """What a pipeline does with a new version: load it on every replica, one after the
        other, a few seconds apart, while traffic flows; the replica that drives rollouts
        first, the order that used to fail: the canary started on its load, and the other
        replica failed the requests it sent there (``drive`` asserts every answer). The
        rollout starts once every replica serves the version."""
        leader = self.rollout_leader()
        for i in sorted(range(len(self.replicas)), key=lambda i: i != leader):
            url = self.replicas[i].url + "/v2/repository/models/fraud/load"
            r = self.client.post(url, json={"parameters": {"versions": [version]}}, headers=ADMIN)
            assert r.status_code == 200, r.text
            apart = time.monotonic() + LOADS_APART_S
            while time.monotonic() < apart:
                self.drive()

    def rollout_leader(self) -> int:
        """The replica holding the rollout lease (``turnout_rollout_leader`` 1)."""

        def leader() -> int | None:
            for i, replica in enumerate(self.replicas):
                if "\nturnout_rollout_leader 1.0" in self.client.get(replica.url + "/metrics").text:
                    return i
            return None

        found: list[int] = self.driving(
            lambda: [i for i in [leader()] if i is not None], "a rollout leader"
        )
        return found[0]

    def pages(self, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """Every entry of a paged admin listing (newest first), oldest first."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.get(path, **params, limit=1000, **({"cursor": cursor} if cursor else {}))
            out.extend(page[key])
            cursor = page["next"]
            if cursor is None:
                return out[::-1]


@pytest.fixture
def fleet(tmp_path: Path, demo_repo: Path, prefix: str) -> Iterator[Fleet]:
    repository = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud" / "1", repository / "fraud" / "1")
    sink = EventSink(SECRET).start()
    sinks = tmp_path / "sinks.json"
    sinks.write_text(json.dumps([sink.config("retrain")]))
    args = [
        "--redis-url", REDIS_URL, "--redis-prefix", prefix,
        "--event-sinks", str(sinks),
        "--admin-token", f"ops:operator={OPERATOR_TOKEN}",
    ]  # fmt: skip
    # production lease TTL: nothing here waits for a lease to move, and a stalled replica on a
    # loaded machine must not hand its leases over mid-scenario; nor drop out of the fleet's
    # view (what each replica serves: kept 5 publish periods) while a version loads
    env = {"TURNOUT_LEASE_TTL_S": "3", "TURNOUT_PUBLISH_S": "0.5"}
    replicas = [Server(repository, args=args, env=env, wait_ready=False) for _ in range(2)]
    try:
        for s in replicas:
            s.start()
        for s in replicas:
            s.wait_until_ready()
        with httpx.Client(timeout=30) as client:
            yield Fleet(replicas, sink, World.moved(), client)
    finally:
        for s in replicas:
            if s.process is not None:
                s.stop()
        sink.stop()


def receiver_verify(secret: bytes, header: str, body: bytes) -> bool:
    """docs/events.md's receiver, as a sink's owner would write it (not the gateway's code)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t = int(parts.get("t", "0"))
    if abs(time.time() - t) > 300:
        return False
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts.get("v1", ""))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_order(acts: list[list[tuple[str, ...]]], story: list[tuple[str, ...]]) -> None:
    """Each act of ``acts`` is told in ``story`` after every step of the act before it. Within
    an act the order is free: its steps come from different replicas with nothing between them
    that orders their appends to the fleet's stream (a guard's ``guard.acted`` and the rollout
    engine's ``rollout.rolled_back`` for the change it wrote); each act causes the next."""
    position = 0
    for act in acts:
        found = []
        for step in act:
            try:
                found.append(story.index(step, position))
            except ValueError:
                told = "\n  ".join(f"{i}: {s}" for i, s in enumerate(story))
                raise AssertionError(f"{step} not told after {position}:\n  {told}") from None
        position = max(found) + 1


def test_drift_retrain_shadow_canary_guard_rollback_approval_promotion(
    fleet: Fleet, tmp_path: Path
) -> None:
    repository = tmp_path / "models" / "fraud"
    sha = {"1": sha256_of(repository / "1" / "model.onnx")}

    # 1. the template, through the admin API, by an operator; the engine pins what serves
    body = {"rollout": TEMPLATE, "reason": "fraud: retrained versions shadowed, canaried, approved"}
    r = fleet.client.put(
        fleet.replicas[1].url + "/admin/routes/fraud/rollout", json=body, headers=OPERATOR
    )
    assert r.status_code == 200, r.text
    template_revision = r.json()["revision"]
    engine = f"rollout:{template_revision}"
    fleet.driving(lambda: fleet.serving() == ("single", "1"), "version 1 pinned")

    # 2. the world moves: a batch of scoring from it, then the sink hears of the drift
    batch = fleet.world.rows[:1200]
    r = fleet.client.post(
        fleet.replicas[0].url + "/v2/models/fraud/infer",
        content=orjson.dumps({"inputs": [{"name": "input", "shape": list(batch.shape),
                                          "datatype": "FP32", "data": batch.ravel().tolist()}]}),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    drift = fleet.driving(
        lambda: fleet.at_sink("drift.changed", subject="fraud/1/f0"), "drift.changed at the sink"
    )
    assert (drift["data"]["from"], drift["data"]["to"]) == ("stable", "act")
    assert drift["data"]["psi"] > 0.25

    # 3. the pipeline retrains (wrongly, as it turns out) and loads v2; the template takes it
    sha["2"] = fleet.world.retrain(repository / "2", right=False)
    fleet.load("2")

    # 4a. shadowed, then canaried (the audit trail shows both below; a phase this short is not
    # waited for, a loaded machine may step over it between two looks): its labels show it
    # wrong, and the quality guard rolls it back
    fleet.driving(lambda: fleet.in_phase("2", "rolled_back"), "v2 rolled back by the guard")
    assert fleet.serving() == ("single", "1")
    assert fleet.served["2"] >= MIN_LABELS

    # 4b. told of the rollback, the pipeline retrains (rightly) and loads v3
    fleet.driving(lambda: fleet.at_sink("rollout.rolled_back", version="2"), "rolled_back at sink")
    sha["3"] = fleet.world.retrain(repository / "3", right=True)
    fleet.load("3")
    fleet.driving(lambda: fleet.in_phase("3", "awaiting_approval"), "v3 awaiting approval")
    requested = fleet.driving(
        lambda: fleet.at_sink("approval.requested", version="3"), "approval.requested at sink"
    )
    assert requested["data"]["reason"] == "awaiting approval before promotion"
    url = fleet.replicas[0].url + "/admin/routes/fraud/actions/approve"
    r = fleet.client.post(url, json={"reason": "v3 beats v1 on live labels"}, headers=OPERATOR)
    assert r.status_code == 200, r.text
    fleet.driving(lambda: fleet.in_phase("3", "promoted"), "v3 promoted")
    assert fleet.serving(0) == fleet.serving(1) == ("single", "3")

    # 5. the audit trail, oldest first: every step, who took it, the artifacts it served
    audit = fleet.pages("/admin/audit", "entries", model="fraud")
    assert [(e["who"], e["action"]) for e in audit] == [
        ("ops", "rollout_put"),
        (engine, "pin"),
        (engine, "rollout_start"),  # v2's shadow
        (engine, "advance"),  # canary step 1
        (f"guard:{FLOOR}", "rollback"),
        (engine, "rollout_start"),  # v3's shadow
        (engine, "advance"),
        (engine, "advance"),
        ("ops", "approve"),
        (engine, "promote"),
    ]
    artifacts = [e["artifacts"] for e in audit]
    assert artifacts[1] == {"1": sha["1"]}
    assert artifacts[2] == artifacts[3] == {"1": sha["1"], "2": sha["2"]}
    assert artifacts[4] == {"1": sha["1"]}
    assert artifacts[5] == artifacts[6] == artifacts[7] == {"1": sha["1"], "3": sha["3"]}
    assert artifacts[9] == {"3": sha["3"]}
    evidence = audit[4]["details"]["quality"]["2"]
    assert evidence["labels"] >= MIN_LABELS and evidence["baseline_labels"] >= MIN_LABELS
    assert audit[8]["reason"] == "v3 beats v1 on live labels"
    assert audit[8]["details"]["version"] == "3"
    assert "approved by ops" in audit[9]["reason"]

    # ... and the event stream: the outbox's listing, the same as the sink took, in order
    events = fleet.pages("/admin/events", "events")
    until(lambda: len(fleet.sink.taken()) >= len(events), timeout_s=DEADLINE_S)
    taken = fleet.sink.taken()
    assert [e["id"] for e in taken][: len(events)] == [e["id"] for e in events]
    assert len({e["id"] for e in taken}) == len(taken)  # once per fleet: no event twice
    assert all(receiver_verify(SECRET.encode(), h, b) for h, b in fleet.sink.signed)
    assert fleet.sink.bad == []
    drifts = [e for e in taken if e["type"] == "dev.turnout.drift.changed"]
    assert [e["subject"] for e in drifts].count("fraud/1/f0") == 1
    story = [_step(e) for e in events]
    in_order(
        [
            [("policy.changed", engine, "pin")],
            [("drift.changed", "fraud/1/f0", "act")],
            [("model.loaded", "2", sha["2"])],
            [("policy.changed", engine, "rollout_start"), ("rollout.started", "2")],
            [("policy.changed", engine, "advance"), ("rollout.advanced", "2")],
            [("guard.breached", FLOOR, "2")],
            [
                ("policy.changed", f"guard:{FLOOR}", "rollback"),
                ("guard.acted", FLOOR, "2"),
                ("rollout.rolled_back", "2"),
            ],
            [("model.loaded", "3", sha["3"])],
            [("policy.changed", engine, "rollout_start"), ("rollout.started", "3")],
            [("rollout.advanced", "3")],
            [("rollout.advanced", "3")],
            [("approval.requested", "3")],
            [
                ("approval.granted", "3", "ops"),
                ("policy.changed", engine, "promote"),
                ("rollout.promoted", "3"),
            ],
        ],
        story,
    )
    assert story.count(("model.loaded", "2", sha["2"])) == 2  # one per replica
    assert story.count(("model.loaded", "3", sha["3"])) == 2


def _step(event: dict[str, Any]) -> tuple[str, ...]:
    """An event as a step of the story: its kind and what identifies it."""
    kind = event["type"].removeprefix("dev.turnout.")
    data = event["data"]
    if kind == "drift.changed":
        return (kind, event["subject"], data["to"])
    if kind.startswith("model."):
        return (kind, data["version"], data.get("sha256") or "")
    if kind == "policy.changed":
        return (kind, data["who"], data["action"])
    if kind.startswith("guard."):
        return (kind, data["condition"], data["version"])
    if kind == "approval.granted":
        return (kind, data["version"], data["who"])
    return (kind, str(data.get("version", "")))
