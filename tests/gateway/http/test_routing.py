"""Routing through a real gateway: policies, actions, audit, feedback, shadows, reports.

Statistical tolerances: an observed share of n requests with true share p is within 4.5 σ,
σ = sqrt(p(1-p)/n), except with probability < 1e-5 per assertion; the seeds fix the draws anyway.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.support.models import write_slow_fraud
from tests.support.server import ADMIN, InProcessServer, until

ROW = sample_inputs("fraud", 1, seed=1)["input"]
BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW.ravel().tolist()}
        ]
    }
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("routing") / "models"
    shutil.copytree(demo_repo, root, ignore=shutil.ignore_patterns("echo", "risk"))
    shutil.copytree(root / "fraud" / "1", root / "fraud" / "3")
    return root


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    """The routing repository plus version 9, a slow model (its load takes seconds)."""
    root = tmp_path_factory.mktemp("slow") / "models"
    shutil.copytree(repo, root)
    write_slow_fraud(root / "fraud" / "9", per_row=False)
    return root


@pytest.fixture
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo) as s:
        yield s


def put(
    server: InProcessServer, policy: dict[str, Any], reason: str = "test", **kw: Any
) -> httpx.Response:
    return httpx.put(
        f"{server.url}/admin/routes/fraud",
        json={"policy": policy, "reason": reason},
        headers={**ADMIN, **kw.pop("headers", {})},
        **kw,
    )


def action(server: InProcessServer, name: str, reason: str = "test") -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/routes/fraud/actions/{name}", json={"reason": reason}, headers=ADMIN
    )


async def fire(
    server: InProcessServer,
    n: int,
    headers: list[dict[str, str]] | None = None,
    concurrency: int = 16,
) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> dict[str, Any]:
            async with sem:
                r = await client.post(
                    "/v2/models/fraud/infer", content=BODY, headers=headers[i] if headers else None
                )
                assert r.status_code == 200, r.text
                body: dict[str, Any] = r.json()
                return body

        return await asyncio.gather(*(one(i) for i in range(n)))


def feedback_is(server: InProcessServer, n: int) -> bool:
    report = httpx.get(server.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    return sum(int(v["feedback"]) for v in report["versions"]) == n


def within(observed: int, n: int, p: float) -> bool:
    return abs(observed / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


# -- admin API ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer not-a-valid-token"}], ids=["missing", "wrong"]
)
def test_admin_needs_a_valid_token(gateway: InProcessServer, headers: dict[str, str]) -> None:
    calls = [
        ("GET", "/admin/routes"), ("GET", "/admin/routes/fraud"), ("PUT", "/admin/routes/fraud"),
        ("POST", "/admin/routes/fraud/actions/advance"), ("GET", "/admin/audit"),
        ("GET", "/admin/routes/fraud/report"), ("DELETE", "/admin/routes/fraud"),
    ]  # fmt: skip
    for method, path in calls:
        r = httpx.request(
            method,
            gateway.url + path,
            headers=headers,
            json={"policy": {"strategy": "single", "version": "1"}, "reason": "x"},
        )
        assert r.status_code == 401, (method, path)
    assert httpx.get(gateway.url + "/admin/audit", headers=ADMIN).json()["entries"] == []


def test_no_policy_serves_the_highest_version_and_pinned_bypasses(gateway: InProcessServer) -> None:
    r = httpx.post(gateway.url + "/v2/models/fraud/infer", content=BODY).json()
    assert r["model_version"] == "3" and "parameters" not in r
    assert put(gateway, {"strategy": "single", "version": "1"}).status_code == 200
    assert (
        httpx.post(gateway.url + "/v2/models/fraud/infer", content=BODY).json()["model_version"]
        == "1"
    )
    assert (
        httpx.post(gateway.url + "/v2/models/fraud/versions/2/infer", content=BODY).json()[
            "model_version"
        ]
        == "2"
    )


def test_canary_split_actions_and_audit(gateway: InProcessServer, repo: Path) -> None:
    r = put(
        gateway,
        {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.2, "seed": 1},
        reason="start rollout",
    )
    assert r.status_code == 200, r.text
    first = r.json()["revision"]
    assert r.headers["etag"] == f'"{first}"'
    assert r.json()["shares"] == {"1": 0.8, "2": 0.2}
    results = asyncio.run(fire(gateway, 2000))
    counts = Counter(b["model_version"] for b in results)
    assert within(counts["2"], 2000, 0.2), counts
    assert {b["parameters"]["propensity"] for b in results if b["model_version"] == "2"} == {0.2}
    assert {b["parameters"]["policy_revision"] for b in results} == {first}

    assert action(gateway, "advance").json()["policy"]["weight"] == 0.25
    assert action(gateway, "pause").json()["policy"]["paused"] is True
    blocked = action(gateway, "advance")
    assert blocked.status_code == 409 and "paused" in blocked.json()["error"]
    assert action(gateway, "resume").status_code == 200
    promoted = action(gateway, "promote", reason="metrics fine")
    assert promoted.json()["policy"] == {"strategy": "single", "version": "2", "seed": 1}
    assert action(gateway, "switch").status_code == 409
    assert {b["model_version"] for b in asyncio.run(fire(gateway, 50))} == {"2"}

    entries = httpx.get(
        gateway.url + "/admin/audit", params={"model": "fraud"}, headers=ADMIN
    ).json()["entries"]
    assert [e["action"] for e in entries] == ["promote", "resume", "pause", "advance", "put"]
    assert [e["revision"] for e in entries] == sorted(
        (e["revision"] for e in entries), reverse=True
    )
    newest, oldest = entries[0], entries[-1]
    assert newest["who"] == "tester" and newest["reason"] == "metrics fine"
    assert newest["before"]["strategy"] == "canary"
    assert newest["after"] == promoted.json()["policy"]
    assert newest["artifacts"] == {
        "2": hashlib.sha256((repo / "fraud/2/model.onnx").read_bytes()).hexdigest()
    }
    assert oldest["before"] is None and set(oldest["artifacts"]) == {"1", "2"}
    assert time.time() - 60 < oldest["at"] <= newest["at"] <= time.time() + 1


def test_rollback_returns_to_the_baseline(gateway: InProcessServer) -> None:
    put(gateway, {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.5})
    assert action(gateway, "rollback", reason="errors up").json()["policy"] == {
        "strategy": "single",
        "version": "1",
    }


INVALID = [
    ("strategy", {"strategy": "roulette"}),
    ("weight", {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 1.5}),
    ("arms", {"strategy": "ab", "arms": {"1": 0.5, "2": 0.6}}),
    ("candidate", {"strategy": "canary", "baseline": "1", "candidate": "5", "weight": 0.1}),
    ("algorithm", {"strategy": "bandit", "arms": ["1", "2"], "algorithm": "greedy"}),
    ("steps", {"strategy": "canary", "baseline": "1", "candidate": "2", "steps": [0.5, 0.25]}),
    ("colour", {"strategy": "single", "version": "1", "colour": "red"}),
]


@pytest.mark.parametrize(
    ("field", "policy"), [c[1:] and (c[0], c[1]) for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_policies_name_the_field_and_change_nothing(
    gateway: InProcessServer, field: str, policy: dict[str, Any]
) -> None:
    before = httpx.get(gateway.url + "/admin/routes", headers=ADMIN).json()
    r = put(gateway, policy)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]
    assert httpx.get(gateway.url + "/admin/routes", headers=ADMIN).json() == before
    assert httpx.get(gateway.url + "/admin/audit", headers=ADMIN).json()["entries"] == []


def test_a_reason_is_required_and_unknown_models_are_404(gateway: InProcessServer) -> None:
    r = httpx.put(
        gateway.url + "/admin/routes/fraud",
        json={"policy": {"strategy": "single", "version": "1"}},
        headers=ADMIN,
    )
    assert r.status_code == 400 and "reason" in r.json()["error"]
    r = httpx.put(
        gateway.url + "/admin/routes/ghost",
        json={"policy": {"strategy": "single", "version": "1"}, "reason": "x"},
        headers=ADMIN,
    )
    assert r.status_code == 404
    assert httpx.get(gateway.url + "/admin/routes/fraud", headers=ADMIN).status_code == 404


def test_if_match_and_dry_run(gateway: InProcessServer) -> None:
    rev = put(gateway, {"strategy": "single", "version": "1"}).json()["revision"]
    stale = put(
        gateway, {"strategy": "single", "version": "2"}, headers={"If-Match": f'"{rev - 1}"'}
    )
    assert stale.status_code == 412 and str(rev) in stale.json()["error"]
    dry = put(gateway, {"strategy": "ab", "arms": {"1": 0.3, "2": 0.7}}, params={"dry_run": "true"})
    assert (
        dry.status_code == 200
        and dry.json()["dry_run"] is True
        and dry.json()["shares"] == {"1": 0.3, "2": 0.7}
    )
    current = httpx.get(gateway.url + "/admin/routes/fraud", headers=ADMIN)
    assert (
        current.json()["policy"] == {"strategy": "single", "version": "1"}
        and current.headers["etag"] == f'"{rev}"'
    )
    ok = put(
        gateway,
        {"strategy": "single", "version": "2"},
        headers={"If-Match": current.headers["etag"]},
    )
    assert ok.status_code == 200 and ok.json()["revision"] == rev + 1
    assert len(httpx.get(gateway.url + "/admin/audit", headers=ADMIN).json()["entries"]) == 2


def test_versions_named_by_a_policy_cannot_be_unloaded(gateway: InProcessServer) -> None:
    put(gateway, {"strategy": "blue_green", "active": "1", "standby": "2"})
    r = httpx.post(
        gateway.url + "/v2/repository/models/fraud/unload",
        headers=ADMIN,
        json={"parameters": {"versions": ["2"]}},
    )
    assert r.status_code == 409 and "policy" in r.json()["error"]
    assert (
        httpx.post(
            gateway.url + "/v2/repository/models/fraud/unload",
            headers=ADMIN,
            json={"parameters": {"versions": ["3"]}},
        ).status_code
        == 200
    )


# -- behaviour under traffic ---------------------------------------------------------------
def test_blue_green_switch_under_load_fails_no_request(gateway: InProcessServer) -> None:
    put(gateway, {"strategy": "blue_green", "active": "1", "standby": "2"})

    async def scenario() -> list[tuple[float, int, str]]:
        seen: list[tuple[float, int, str]] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

            async def traffic() -> None:
                while not stop.is_set():
                    r = await client.post("/v2/models/fraud/infer", content=BODY)
                    seen.append(
                        (time.monotonic(), r.status_code, r.json().get("model_version", ""))
                    )

            tasks = [asyncio.create_task(traffic()) for _ in range(8)]
            await asyncio.sleep(0.5)
            switched = await client.post(
                "/admin/routes/fraud/actions/switch", json={"reason": "release"}, headers=ADMIN
            )
            assert switched.status_code == 200
            mark = time.monotonic()
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        seen.append((mark, -1, ""))
        return seen

    seen = asyncio.run(scenario())
    mark = seen.pop()[0]
    assert {status for _, status, _ in seen} == {200}
    assert {v for t, _, v in seen if t > mark + 0.05} == {"2"}  # sent after the switch answered
    assert Counter(v for _, _, v in seen)["1"] > 0


def test_sticky_ab_assignment_is_the_same_on_every_replica(repo: Path) -> None:
    policy = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "sticky": "header:x-user-id"}
    users = [{"x-user-id": f"user-{i}"} for i in range(300)]
    with InProcessServer(repo) as a, InProcessServer(repo) as b:
        put(a, policy)
        put(b, policy)
        first = asyncio.run(fire(a, 300, users))
        second = asyncio.run(fire(b, 300, users))
        again = asyncio.run(fire(a, 300, users))
    assignment = [r["model_version"] for r in first]
    assert assignment == [r["model_version"] for r in second] == [r["model_version"] for r in again]
    assert within(assignment.count("2"), 300, 0.5)


def test_report_flags_a_sample_ratio_mismatch(gateway: InProcessServer) -> None:
    put(
        gateway,
        {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "sticky": "header:x-user-id", "seed": 3},
    )
    asyncio.run(fire(gateway, 1000))  # no key: a fair random split
    fair = httpx.get(gateway.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    assert fair["srm"]["flagged"] is False and sum(v["served"] for v in fair["versions"]) == 1000
    # One heavy sticky user lands 300 more requests on a single arm: the split is now skewed.
    asyncio.run(fire(gateway, 300, [{"x-user-id": "bot"}] * 300))
    skewed = httpx.get(gateway.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    assert skewed["srm"]["flagged"] is True and skewed["srm"]["p_value"] < 0.001


def test_feedback_joins_rewards_and_the_bandit_learns(gateway: InProcessServer) -> None:
    policy = {
        "strategy": "bandit",
        "arms": ["1", "2"],
        "algorithm": "thompson",
        "min_share": 0.1,
        "seed": 5,
    }
    put(gateway, policy)
    bad = httpx.post(
        gateway.url + "/v2/models/fraud/feedback", json={"id": "never-served", "reward": 1}
    )
    assert bad.status_code == 404
    served: Counter[str] = Counter()
    for round_ in range(1, 7):
        results = asyncio.run(fire(gateway, 150))
        with httpx.Client(base_url=gateway.url) as client:
            for b in results:
                served[b["model_version"]] += 1
                assert 0.0 < b["parameters"]["propensity"] <= 1.0
                r = client.post(
                    "/v2/models/fraud/feedback",
                    json={"id": b["id"], "reward": 1.0 if b["model_version"] == "2" else 0.0},
                )
                assert r.status_code == 200 and r.json()["version"] == b["model_version"]
        # the bandit folds in the fleet's totals on the flush after they reach the store
        until(functools.partial(feedback_is, gateway, 150 * round_))
    last = Counter(b["model_version"] for b in asyncio.run(fire(gateway, 400)))
    # Version 2 always pays: the bandit sends it almost everything but the 10 % floor of version 1.
    assert last["2"] > last["1"] and within(last["1"], 400, 0.1), last
    out_of_range = httpx.post(
        gateway.url + "/v2/models/fraud/feedback", json={"id": results[0]["id"], "reward": 3}
    )
    assert out_of_range.status_code == 400 and "reward" in out_of_range.json()["error"]
    report = httpx.get(gateway.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    means = {v["version"]: v["reward_mean"] for v in report["versions"]}
    assert means == {"1": 0.0, "2": 1.0}


def test_a_slow_shadow_never_slows_the_caller(slow_repo: Path) -> None:
    # Version 9 is many times slower than version 1 (measured here, not assumed: machines differ);
    # the caller's requests must not wait for it.
    with InProcessServer(slow_repo) as gateway:
        slow_shadow_scenario(gateway)


def slow_shadow_scenario(gateway: InProcessServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        fast = sorted(
            client.post("/v2/models/fraud/versions/1/infer", content=BODY).elapsed.total_seconds()
            for _ in range(9)
        )[4]
        slow = client.post("/v2/models/fraud/versions/9/infer", content=BODY)
    assert slow.status_code == 200 and slow.elapsed.total_seconds() > 20 * fast, (slow, fast)
    put(
        gateway,
        {"strategy": "single", "version": "1", "shadow": {"versions": ["9"], "sample": 1.0}},
    )
    with httpx.Client(base_url=gateway.url) as client:
        elapsed = []
        for _ in range(40):
            r = client.post("/v2/models/fraud/infer", content=BODY)
            assert r.status_code == 200 and r.json()["model_version"] == "1"
            elapsed.append(r.elapsed.total_seconds())
    elapsed.sort()
    assert elapsed[len(elapsed) // 2] < slow.elapsed.total_seconds() / 4, elapsed
    report = httpx.get(gateway.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    (shadow,) = report["shadows"]
    assert (shadow["primary"], shadow["shadow"]) == ("1", "9")
    assert shadow["requests"] + shadow["dropped"] + shadow["inflight"] >= 1


def test_a_light_shadow_compares_every_request(gateway: InProcessServer) -> None:
    # Version 2 runs in microseconds: its copies run on the event loop, after each response.
    put(
        gateway,
        {"strategy": "single", "version": "1", "shadow": {"versions": ["2"], "sample": 1.0}},
    )
    served = 0
    with httpx.Client(base_url=gateway.url) as client:
        for _ in range(50):
            r = client.post("/v2/models/fraud/infer", content=BODY)
            assert r.status_code == 200 and r.json()["model_version"] == "1"
            served += 1
        pinned = [
            client.post(f"/v2/models/fraud/versions/{v}/infer", content=BODY).json()
            for v in ("1", "2")
        ]
    report = httpx.get(gateway.url + "/admin/routes/fraud/report", headers=ADMIN).json()
    (shadow,) = [s for s in report["shadows"] if s["shadow"] == "2"]
    assert (shadow["requests"], shadow["errors"], shadow["dropped"]) == (served, 0, 0)
    # Every request sent the same body, so the mean difference is that of the two versions.
    one, two = (np.asarray(p["outputs"][0]["data"]) for p in pinned)
    assert shadow["mean_abs_diff"] == pytest.approx(float(np.abs(one - two).mean()), rel=1e-5)
