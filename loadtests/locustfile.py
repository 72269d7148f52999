"""A mixed, user-shaped load for Turnout's demo repository (wrk measures the ceilings; this
checks behaviour under traffic that looks like production).

Each simulated user has a sticky ``x-user-id``; it mostly scores ``fraud``, sometimes calls the
multi-input ``risk`` model, and now and then posts feedback for one of its recent ``fraud``
answers. Feedback joins only while ``fraud`` has a routing policy: with ``BENCH_ADMIN_TOKEN``
set, the test start installs a sticky canary (1 → 2, 10 %) on ``fraud``.

Run: ``locust -f loadtests/locustfile.py --headless -u 10 -r 5 -t 5s --host http://127.0.0.1:8000``
"""

from __future__ import annotations

import os
import random
from collections import deque
from typing import Any

import httpx
from locust import HttpUser, between, events, task
from locust.env import Environment

FRAUD_FEATURES = 32
RISK_FEATURES = 8
CANARY = {
    "strategy": "canary",
    "baseline": "1",
    "candidate": "2",
    "weight": 0.1,
    "sticky": "header:x-user-id",
}


def install_canary(environment: Environment, **kwargs: Any) -> None:
    token = os.environ.get("BENCH_ADMIN_TOKEN")
    if not token or not environment.host:
        return
    response = httpx.put(
        f"{environment.host}/admin/routes/fraud",
        headers={"Authorization": f"Bearer {token}"},
        json={"policy": CANARY, "reason": "locust mixed scenario"},
        timeout=10,
    )
    response.raise_for_status()


events.test_start.add_listener(install_canary)  # type: ignore[no-untyped-call]


def tensor(name: str, datatype: str, rows: list[list[Any]]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [len(rows), len(rows[0])], "data": rows}


class GatewayUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.user_id = f"user-{self.rng.randrange(1_000_000):06d}"
        self.recent: deque[str] = deque(maxlen=20)

    def row(self, n: int) -> list[float]:
        return [self.rng.gauss(0.0, 1.0) for _ in range(n)]

    @task(20)
    def score_fraud(self) -> None:
        body = {"inputs": [tensor("input", "FP32", [self.row(FRAUD_FEATURES)])]}
        with self.client.post(
            "/v2/models/fraud/infer",
            json=body,
            headers={"x-user-id": self.user_id},
            name="fraud infer",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            self.recent.append(response.json()["id"])

    @task(3)
    def score_risk(self) -> None:
        flags = [[self.rng.random() < p for p in (0.5, 0.2, 0.05, 0.8)]]
        body = {
            "inputs": [
                tensor("features", "FP32", [self.row(RISK_FEATURES)]),
                tensor("segment", "INT64", [[self.rng.randrange(5)]]),
                tensor("flags", "BOOL", flags),
            ]
        }
        self.client.post(
            "/v2/models/risk/infer", json=body, headers={"x-user-id": self.user_id}, name="risk"
        )

    @task(1)
    def feedback(self) -> None:
        if not self.recent:
            return
        reward = 1.0 if self.rng.random() < 0.1 else 0.0
        self.client.post(
            "/v2/models/fraud/feedback",
            json={"id": self.recent.popleft(), "reward": reward},
            name="fraud feedback",
        )
