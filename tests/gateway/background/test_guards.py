"""Rollout guards through real gateways (in process) under real concurrent load.

Every request sent is counted and every response accounted for: a failure to a caller must be
one the failing candidate produced itself, matched against the gateway's own counters.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.conftest import REDIS_URL
from tests.support.models import write_failing_fraud
from tests.support.server import ADMIN, GatewayServer, InProcessServer, Server

FAIL_SHARE = 0.4
# Feature 28 of the demo's fraud inputs is uniform on [0, 1): the candidate fails when it
# exceeds 1 - FAIL_SHARE, so on about 40 % of requests, yet passes the all-zeros warm-up.
FAIL_FEATURE = 28
ROWS = sample_inputs("fraud", 400, seed=3)["input"]
BODIES = [
    orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": row.tolist()}]}
    )
    for row in ROWS
]
FAILING_GUARDS = {"window_s": 10, "min_requests": 40, "interval_s": 0.5, "max_error_ratio": 0.01}
FAILING_CANARY = {
    "strategy": "canary",
    "baseline": "1",
    "candidate": "3",
    "weight": 0.25,
    "seed": 7,
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("guards") / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    write_failing_fraud(root / "fraud" / "3", FAIL_FEATURE, 1.0 - FAIL_SHARE)
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo) as s:
        yield s


# -- load -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    sent_at: float
    status: int  # 0: no response (a transport error)
    version: str | None
    error: str | None


class Load:
    """Concurrent inference requests spread over ``urls`` until stopped; counts every one."""

    def __init__(self, urls: list[str], concurrency: int = 8) -> None:
        self.urls = urls
        self.concurrency = concurrency
        self.sent = 0
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, i: int) -> None:
        while not self.stop.is_set():
            url = self.urls[i % len(self.urls)] + "/v2/models/fraud/infer"
            body = BODIES[i % len(BODIES)]
            i += self.concurrency
            self.sent += 1
            sent_at = time.monotonic()
            try:
                r = await client.post(url, content=body)
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(sent_at, 0, None, repr(exc)))
                continue
            payload = r.json()
            self.outcomes.append(
                Outcome(sent_at, r.status_code, payload.get("model_version"), payload.get("error"))
            )


async def policy_of(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await client.get(url + "/admin/routes/fraud", headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def load_until(
    urls: list[str], done: Any, timeout_s: float, then_s: float
) -> tuple[Load, float, dict[str, Any]]:
    """Run load until ``done(policy)`` holds on the first url's policy (polled every 50 ms),
    then ``then_s`` more seconds. Returns the load, when the change was seen, and the policy."""
    load = Load(urls)
    runner = asyncio.create_task(load.run())
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            policy = await policy_of(client, urls[0])
            if done(policy):
                seen_at = time.monotonic()
                break
            if time.monotonic() > deadline or runner.done():
                load.stop.set()
                await runner
                pytest.fail(f"no change within {timeout_s} s; policy {policy}")
            await asyncio.sleep(0.05)
    await asyncio.sleep(then_s)
    load.stop.set()
    await runner
    return load, seen_at, policy


def put_policy(server: GatewayServer, policy: dict[str, Any]) -> int:
    r = httpx.put(
        server.url + "/admin/routes/fraud",
        json={"policy": policy, "reason": "guards test"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    revision: int = r.json()["revision"]
    return revision


def audit(server: GatewayServer) -> list[dict[str, Any]]:
    r = httpx.get(server.url + "/admin/audit?model=fraud&limit=100", headers=ADMIN)
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


def samples(server: GatewayServer, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of ``name`` the gateway exports."""
    found = []
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            found.append((labels, float(m.group(2))))
    return found


def server_count(server: GatewayServer, version: str, code: str) -> int:
    return sum(
        int(value)
        for labels, value in samples(server, "turnout_requests_total")
        if labels["model"] == "fraud" and labels["version"] == version and labels["code"] == code
    )


def metric(server: GatewayServer, name: str, **want: str) -> float | None:
    for labels, value in samples(server, name):
        if all(labels.get(k) == v for k, v in want.items()):
            return value
    return None


def check_accounting(
    load: Load, servers: Sequence[GatewayServer], rolled_back_seen_at: float
) -> int:
    """Every request answered; every failure a 500 the candidate (version 3) produced, as the
    gateways counted them; nothing but version 1 once the rollback was visible. Returns the
    number of failures."""
    assert load.sent == len(load.outcomes)
    assert not [o for o in load.outcomes if o.status == 0], "requests left unanswered"
    failed = [o for o in load.outcomes if o.status != 200]
    assert {o.status for o in failed} <= {500}
    assert all(o.error and "model execution failed" in o.error for o in failed)
    assert len(failed) == sum(server_count(s, "3", "500") for s in servers)
    for code in ("400", "404", "429", "503", "504"):
        assert sum(server_count(s, v, code) for s in servers for v in ("1", "2", "3", "")) == 0
    after = [o for o in load.outcomes if o.sent_at > rolled_back_seen_at]
    assert after, "no load after the rollback"
    assert all(o.status == 200 and o.version == "1" for o in after)
    return len(failed)


# -- tests ----------------------------------------------------------------------------------------
def test_a_failing_candidate_is_rolled_back_under_load_with_the_evidence(
    gateway: GatewayServer,
) -> None:
    put_at = time.monotonic()
    revision = put_policy(gateway, {**FAILING_CANARY, "guards": FAILING_GUARDS})
    load, seen_at, policy = asyncio.run(
        load_until(
            [gateway.url], lambda p: p["policy"]["strategy"] == "single", timeout_s=30, then_s=0.5
        )
    )
    assert seen_at - put_at < 15.0
    assert policy["policy"]["version"] == "1"
    failures = check_accounting(load, [gateway], seen_at)

    entry = audit(gateway)[0]
    assert (entry["who"], entry["action"]) == ("guard:max_error_ratio", "rollback")
    assert entry["revision"] == policy["revision"] > revision
    assert entry["before"]["candidate"] == "3"
    details = entry["details"]
    assert details["verdict"] == "breach"
    assert details["revision"] == revision
    assert details["guards"]["max_error_ratio"] == 0.01
    assert 0 < details["window"]["covered_s"] <= FAILING_GUARDS["window_s"]
    check = next(c for c in details["checks"] if c["guard"] == "max_error_ratio")
    assert (check["version"], check["status"], check["threshold"]) == ("3", "breach", 0.01)
    assert check["requests"] >= FAILING_GUARDS["min_requests"]
    assert 0.01 < check["lower_bound"] == check["value"] < check["error_ratio"]
    # the window's errors are failures callers saw
    assert 0 < details["versions"]["3"]["errors"] == check["errors"] <= failures

    assert metric(gateway, "turnout_guard_actions_total", model="fraud", action="rollback") == 1
    breaches = metric(gateway, "turnout_guard_evaluations_total", model="fraud", verdict="breach")
    assert breaches is not None and breaches >= 1
    assert metric(gateway, "turnout_guard_leader") == 1
    assert (
        metric(gateway, "turnout_guard_threshold", model="fraud", guard="max_error_ratio") == 0.01
    )

    report = httpx.get(gateway.url + "/admin/routes/fraud/guards", headers=ADMIN).json()
    assert report["leader"] is True
    assert report["last_action"]["action"] == "rollback"
    assert report["last_action"]["details"]["checks"] == details["checks"]
    assert report["thresholds"] == {"max_error_ratio": 0.01}
    assert report["strategy"] == "single"


def test_a_healthy_candidate_walks_every_step_to_promotion(gateway: GatewayServer) -> None:
    guards = {
        "window_s": 5,
        "min_requests": 25,
        "interval_s": 0.5,
        "advance_after_s": 0.5,
        "max_error_ratio": 0.01,
        "max_p99_ratio_to_baseline": 10.0,
    }
    canary: dict[str, Any] = {"strategy": "canary", "baseline": "1", "candidate": "2"}
    canary |= {"steps": [0.2, 0.6, 1.0], "seed": 8}
    revision = put_policy(gateway, {**canary, "guards": guards})
    load, _, policy = asyncio.run(
        load_until(
            [gateway.url], lambda p: p["policy"]["strategy"] == "single", timeout_s=30, then_s=0.2
        )
    )
    assert policy["policy"]["version"] == "2"
    assert load.sent == len(load.outcomes)
    assert all(o.status == 200 for o in load.outcomes)

    entries = [e for e in reversed(audit(gateway)) if e["revision"] > revision]
    assert [(e["action"], e["who"]) for e in entries] == [
        ("advance", "guard:advance_after_s"),
        ("advance", "guard:advance_after_s"),
        ("promote", "guard:advance_after_s"),
    ]
    assert [e["before"]["weight"] for e in entries] == [0.2, 0.6, 1.0]
    times = [e["at"] for e in entries]
    assert all(b - a >= guards["advance_after_s"] for a, b in itertools.pairwise(times))
    for e in entries:
        assert e["details"]["verdict"] == "pass"
        gate = e["details"]["versions"]["2"]["requests"]
        assert gate >= guards["min_requests"]


def test_guards_are_validated_and_their_endpoint_is_guarded(gateway: GatewayServer) -> None:
    r = httpx.put(
        gateway.url + "/admin/routes/fraud",
        json={
            "policy": {"strategy": "single", "version": "1", "guards": {"max_error_ratio": 2}},
            "reason": "invalid",
        },
        headers=ADMIN,
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("policy.guards.max_error_ratio:")
    put_policy(gateway, {"strategy": "single", "version": "1"})
    url = gateway.url + "/admin/routes/fraud/guards"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=ADMIN).status_code == 404
    put_policy(gateway, {"strategy": "single", "version": "1", "guards": {"max_p99_s": 1.0}})
    report = httpx.get(url, headers=ADMIN).json()
    assert report["guards"]["max_p99_s"] == 1.0
    assert report["verdict"] in ("insufficient", "pass")
    assert (
        "/admin/routes/{model}/guards" in httpx.get(gateway.url + "/openapi.json").json()["paths"]
    )


# -- what a client cannot make a guard do -------------------------------------------------------
HEALTHY_CANARY = {"strategy": "canary", "baseline": "1", "candidate": "2", "seed": 5}


def evaluations(server: GatewayServer) -> float:
    return sum(
        v
        for labels, v in samples(server, "turnout_guard_evaluations_total")
        if labels.get("model") == "fraud"
    )


async def send_all(url: str, bodies: Sequence[bytes]) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        return [(await client.post(url, content=body)).status_code for body in bodies]


def judge_after(server: GatewayServer, bodies: Sequence[bytes], path: str) -> dict[str, Any]:
    """Send ``bodies`` to ``path``, then wait for three more guard evaluations; the policy."""
    statuses = asyncio.run(send_all(server.url + path, bodies))
    start = evaluations(server)
    deadline = time.monotonic() + 20
    while evaluations(server) < start + 3:
        assert time.monotonic() < deadline, "the guards stopped evaluating"
        time.sleep(0.05)
    policy: dict[str, Any] = httpx.get(server.url + "/admin/routes/fraud", headers=ADMIN).json()
    policy["statuses"] = statuses
    return policy


def test_requests_pinned_to_the_candidate_do_not_walk_it_to_promotion(
    gateway: GatewayServer,
) -> None:
    guards = {"window_s": 10, "min_requests": 25, "interval_s": 0.5, "advance_after_s": 0.5}
    guards |= {"max_error_ratio": 0.5}
    revision = put_policy(gateway, {**HEALTHY_CANARY, "steps": [0.1, 1.0], "guards": guards})
    policy = judge_after(gateway, BODIES[:200], "/v2/models/fraud/versions/2/infer")
    assert set(policy["statuses"]) == {200}
    # 200 good answers from the candidate, yet not one request the policy routed: no step
    assert policy["revision"] == revision
    assert policy["policy"]["weight"] == 0.1
    report = httpx.get(gateway.url + "/admin/routes/fraud/guards", headers=ADMIN).json()
    assert report["verdict"] == "insufficient"


def test_deadlines_a_client_chose_do_not_roll_the_candidate_back(gateway: GatewayServer) -> None:
    guards = {"window_s": 10, "min_requests": 20, "interval_s": 0.5, "max_error_ratio": 0.01}
    revision = put_policy(gateway, {**HEALTHY_CANARY, "weight": 0.5, "guards": guards})
    before = server_count(gateway, "2", "504")
    hurried = [
        orjson.dumps({**orjson.loads(body), "parameters": {"timeout": 1}}) for body in BODIES[:200]
    ]
    policy = judge_after(gateway, hurried, "/v2/models/fraud/infer")
    assert set(policy["statuses"]) == {504}
    assert server_count(gateway, "2", "504") - before > 50  # counted, as what the caller saw
    assert policy["revision"] == revision
    assert policy["policy"]["strategy"] == "canary"


# -- a fleet --------------------------------------------------------------------------------------
@pytest.mark.system
def test_two_replicas_sharing_redis_roll_back_once(repo: Path, prefix: str) -> None:
    # Processes: two in-process gateways cannot share the test process yet, since stopping
    # one (its gc.unfreeze and gc.collect) can hang the other's event loop as it shuts down.
    servers = [
        Server(repo, args=["--redis-url", REDIS_URL, "--redis-prefix", prefix], wait_ready=False)
        for _ in range(2)
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_until_ready()
        a, b = servers
        put_policy(a, {**FAILING_CANARY, "guards": FAILING_GUARDS})
        load, seen_at, _ = asyncio.run(
            load_until(
                [a.url, b.url], lambda p: p["policy"]["strategy"] == "single", 30, then_s=1.5
            )
        )
        check_accounting(load, servers, seen_at + 1.0)  # b learns of the change within 1 s
        by_guard = [e for e in audit(a) if e["who"].startswith("guard:")]
        assert [(e["who"], e["action"]) for e in by_guard] == [
            ("guard:max_error_ratio", "rollback")
        ]
        leaders = [
            httpx.get(s.url + "/admin/routes/fraud/guards", headers=ADMIN).json()["leader"]
            for s in servers
        ]
        assert sorted(leaders) == [False, True]
    finally:
        for s in servers:
            s.stop()
