"""Several gateways sharing routing state through a real Redis.

Replicas that only share Redis are in-process gateways (each a full app with its own store
client); what needs processes of its own (``--workers 2``, a member identity per process in the
fleet views, an exit code) runs ``python -m gateway serve`` and is marked ``system``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway.demo import sample_inputs
from tests.conftest import REDIS_URL
from tests.support.load import bounded, metric_sum
from tests.support.server import (
    ADMIN,
    GatewayServer,
    InProcessServer,
    Server,
    ready_workers,
    until,
)

ROW = sample_inputs("fraud", 1, seed=2)["input"]
BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW.ravel().tolist()}
        ]
    }
)


def started(servers: Sequence[InProcessServer | Server]) -> None:
    """Start every server, then wait for each: they load at the same time."""
    for s in servers:
        s.wait_ready = False
        s.start()
    for s in servers:
        s.wait_until_ready()


@pytest.fixture
def fleet(demo_repo: Path, prefix: str) -> Iterator[list[InProcessServer]]:
    servers = [
        InProcessServer(demo_repo, args=["--redis-url", REDIS_URL, "--redis-prefix", prefix])
        for _ in range(3)
    ]
    try:
        started(servers)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def processes(demo_repo: Path, prefix: str) -> Iterator[list[Server]]:
    """Three gateway processes: the fleet views tell members apart by process id."""
    servers = [
        Server(demo_repo, args=["--redis-url", REDIS_URL, "--redis-prefix", prefix])
        for _ in range(3)
    ]
    try:
        started(servers)
        yield servers
    finally:
        for s in servers:
            s.stop()


def revision_served(server: GatewayServer, model: str = "fraud") -> float:
    """The revision of ``model``'s policy this gateway (this process) routes by."""
    return metric_sum(server.url, "turnout_policy_revision", model=model)


def test_a_policy_changed_through_one_replica_is_served_by_all_within_a_second(
    fleet: list[InProcessServer],
) -> None:
    a, b, c = fleet
    r = httpx.put(
        a.url + "/admin/routes/fraud",
        headers=ADMIN,
        json={"policy": {"strategy": "single", "version": "1"}, "reason": "fleet"},
    )
    assert r.status_code == 200
    revision = r.json()["revision"]
    changed_at = time.monotonic()
    lag: dict[str, float] = {}
    with httpx.Client() as client:
        while len(lag) < 2 and time.monotonic() - changed_at < 5:
            for s in (b, c):
                if s.url not in lag:
                    body = client.post(s.url + "/v2/models/fraud/infer", content=BODY).json()
                    if body.get("parameters", {}).get("policy_revision") == revision:
                        assert body["model_version"] == "1"
                        lag[s.url] = time.monotonic() - changed_at
    assert len(lag) == 2 and max(lag.values()) < 1.0, lag
    # The audit trail is the fleet's: an entry written through a is read through c.
    entries = httpx.get(c.url + "/admin/audit", headers=ADMIN).json()["entries"]
    assert [(e["who"], e["action"], e["revision"]) for e in entries] == [
        ("tester", "put", revision)
    ]


def test_counts_and_feedback_from_every_replica_add_up_exactly(
    fleet: list[InProcessServer], prefix: str
) -> None:
    a, _, _ = fleet
    policy = {"strategy": "bandit", "arms": ["1", "2"], "algorithm": "thompson", "min_share": 0.1}
    put = httpx.put(
        a.url + "/admin/routes/fraud", headers=ADMIN, json={"policy": policy, "reason": "fleet"}
    )
    assert put.status_code == 200
    revision = put.json()["revision"]
    # every replica routes by it (within a second: the previous test)
    until(lambda: all(revision_served(s) == revision for s in fleet))

    async def traffic() -> list[tuple[int, dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(i: int) -> tuple[int, dict[str, Any]]:
                r = await client.post(fleet[i % 3].url + "/v2/models/fraud/infer", content=BODY)
                assert r.status_code == 200
                return i, r.json()

            return await bounded(one(i) for i in range(600))

    served = asyncio.run(traffic())

    async def feedback() -> None:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(i: int, body: dict[str, Any]) -> None:
                # Rewards go to another replica than the one that served: the join is fleet-wide.
                reward = 1.0 if body["model_version"] == "2" else 0.0
                r = await client.post(
                    fleet[(i + 1) % 3].url + "/v2/models/fraud/feedback",
                    json={"id": body["id"], "reward": reward},
                )
                assert r.status_code == 200, r.text
                assert r.json()["version"] == body["model_version"]

            await bounded(one(i, b) for i, b in served)

    # Each replica writes its assignments to Redis in batches (every flush period).
    assignments = [f"{prefix}assign:{body['id']}" for _, body in served]
    with redis.Redis.from_url(REDIS_URL) as store:
        until(lambda: store.exists(*assignments) == len(assignments))
    asyncio.run(feedback())

    def report() -> dict[str, dict[str, Any]]:
        answer = httpx.get(a.url + "/admin/routes/fraud/report", headers=ADMIN).json()
        return {v["version"]: v for v in answer["versions"]}

    # The other replicas push the rewards they took at their next flush.
    until(lambda: sum(v["feedback"] for v in report().values()) >= 600)
    rows = report()
    assert sum(v["served"] for v in rows.values()) == 600
    assert sum(v["feedback"] for v in rows.values()) == 600
    assert rows["2"]["reward_mean"] == 1.0 and rows["1"]["reward_mean"] == 0.0
    expected = {v: sum(1 for _, b in served if b["model_version"] == v) for v in ("1", "2")}
    assert {v: rows[v]["served"] for v in ("1", "2")} == expected


@pytest.mark.system
def test_workers_share_state_through_redis(demo_repo: Path, prefix: str) -> None:
    with Server(
        demo_repo, args=["--workers", "2", "--redis-url", REDIS_URL, "--redis-prefix", prefix]
    ) as s:
        # Ready answers once one worker is; both, so that the requests below reach both.
        until(lambda: ready_workers(s) == 2, timeout_s=60)
        r = httpx.put(
            s.url + "/admin/routes/fraud",
            headers=ADMIN,
            json={"policy": {"strategy": "single", "version": "1"}, "reason": "w"},
        )
        assert r.status_code == 200

        def versions() -> set[str]:
            with httpx.Client() as client:  # new connections land on either worker
                return {
                    client.post(
                        s.url + "/v2/models/fraud/infer",
                        content=BODY,
                        headers={"Connection": "close"},
                    ).json()["model_version"]
                    for _ in range(40)
                }

        # docs/routing.md: served everywhere within a second (tests/system/test_fleet.py holds
        # that bound); here, on a loaded machine, whether both workers get there at all.
        until(lambda: versions() == {"1"}, timeout_s=10)
        assert versions() == {"1"}
        # uvicorn's supervisor killed neither worker while it started (gateway.cli)
        assert "died" not in s.log() and ready_workers(s) == 2


@pytest.mark.system
def test_workers_without_redis_are_refused(demo_repo: Path) -> None:
    server = Server(demo_repo, args=["--workers", "2"], wait_ready=False).start()
    assert server.process is not None
    assert server.process.wait(30) == 2
    server.stop()
    assert "TURNOUT_REDIS_URL" in server.log()


def scrape_total(server: GatewayServer, client: httpx.Client) -> float:
    text = client.get(server.url + "/metrics", headers={"Connection": "close"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("turnout_requests_total{") and 'model="fraud"' in line
    )


def stats_total(
    server: GatewayServer, client: httpx.Client, scope: str = "group"
) -> tuple[int, int]:
    """(successes, inferences) of fraud's versions in the statistics one answer reports."""
    url = f"{server.url}/v2/models/fraud/stats?scope={scope}"
    stats = client.get(url, headers={"Connection": "close"}).json()["model_stats"]
    return (
        sum(s["inference_stats"]["success"]["count"] for s in stats),
        sum(s["inference_count"] for s in stats),
    )


@pytest.mark.system
def test_statistics_add_up_the_replicas_of_the_asked_scope(processes: list[Server]) -> None:
    """Processes: in-process replicas share a process id, so the fleet views would take them
    for one member."""
    fleet = processes
    sent = [5, 7, 0]
    with httpx.Client() as client:
        for server, n in zip(fleet, sent, strict=True):
            for _ in range(n):
                r = client.post(server.url + "/v2/models/fraud/versions/1/infer", content=BODY)
                assert r.status_code == 200, r.text
        # every replica publishes each period: the fleet's figures arrive within a few
        until(lambda: stats_total(fleet[2], client, "fleet") == (12, 12))
        assert stats_total(fleet[2], client, "process") == (0, 0)
        assert stats_total(fleet[0], client) == (5, 5)  # one worker: its group is itself
        assert stats_total(fleet[1], client, "fleet") == (12, 12)


def published(store: redis.Redis, prefix: str) -> tuple[int, int]:
    """(members, fraud requests) in the counters the processes last published to Redis."""
    members = store.smembers(prefix + "members")
    total = 0
    for member in members:
        name = member.decode() if isinstance(member, bytes) else member
        blob = store.hget(f"{prefix}counts:{name}", "traffic")
        if blob is not None:
            requests = orjson.loads(blob)["requests"]
            total += sum(int(n) for model, *_, n in requests if model == "fraud")
    return len(members), total


@pytest.mark.system
def test_every_worker_reports_the_whole_process_group(demo_repo: Path, prefix: str) -> None:
    with (
        Server(
            demo_repo, args=["--workers", "2", "--redis-url", REDIS_URL, "--redis-prefix", prefix]
        ) as s,
        httpx.Client() as client,
        redis.Redis.from_url(REDIS_URL) as store,
    ):
        until(lambda: ready_workers(s) == 2, timeout_s=60)
        for _ in range(60):  # new connections: both workers serve some
            assert (
                client.post(
                    s.url + "/v2/models/fraud/infer",
                    content=BODY,
                    headers={"Connection": "close"},
                ).status_code
                == 200
            )
        # Each worker publishes its counters every period: once both have published all 60,
        # whichever answers a scrape adds the other's to its own.
        until(lambda: published(store, prefix) == (2, 60))
        totals = {scrape_total(s, client) for _ in range(12)}
        # Triton's statistics too: each answer is the group's (fraud v2 took all 60, one row each)
        answered = {stats_total(s, client) for _ in range(12)}
    assert totals == {60.0}
    assert answered == {(60, 60)}


@pytest.mark.system
def test_the_fleet_drift_view_merges_every_replica(processes: list[Server]) -> None:
    # Routed, not pinned: the monitors measure the traffic a policy sends to a version.
    r = httpx.put(
        processes[0].url + "/admin/routes/fraud",
        headers=ADMIN,
        json={"policy": {"strategy": "single", "version": "1"}, "reason": "drift"},
    )
    assert r.status_code == 200
    revision = r.json()["revision"]
    until(lambda: all(revision_served(s) == revision for s in processes))
    x = sample_inputs("fraud", 300, seed=8)["input"]
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [300, 32],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    for s in processes:
        answer = httpx.post(s.url + "/v2/models/fraud/infer", content=body)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    drift = processes[0].url + "/v2/models/fraud/versions/1/drift"

    def fleet_view() -> dict[str, Any]:
        view: dict[str, Any] = httpx.get(drift, params={"scope": "fleet"}).json()
        return view

    # Every replica publishes its monitor counts each period.
    until(lambda: fleet_view()["features"][0]["count"] >= 900)
    own = httpx.get(drift).json()
    whole = fleet_view()
    assert own["features"][0]["count"] == 300 and own["processes"] == 1
    assert whole["features"][0]["count"] == 900 and whole["processes"] == 3
    assert whole["cumulative"]["latency"]["total"]["count"] == 3
    assert httpx.get(drift, params={"scope": "world"}).status_code == 400
