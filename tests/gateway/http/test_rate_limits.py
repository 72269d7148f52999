"""Per-principal rate limits and quotas against real gateways (in-process, real uvicorn), on
this process's memory and on a real Redis (shared by two replicas, and failing)."""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.cli import serve_settings
from gateway.settings import SettingsError
from tests.conftest import REDIS_URL
from tests.support.load import fraud_body, metric_sum
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, InProcessServer, Server, until

KEYS = ["--api-key", "alpha=alpha-key-0123", "--api-key", "beta=beta-key-01234"]
ALPHA = {"X-API-Key": "alpha-key-0123"}
BETA = {"X-API-Key": "beta-key-01234"}
INFER = "/v2/models/fraud/infer"


def rows_body(n: int, value: float = 0.0) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [n, 32], "datatype": "FP32", "data": [value] * 32 * n}
            ]
        }
    )


ONE = rows_body(1)


def limits_file(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / f"limits-{time.monotonic_ns()}.json"
    path.write_bytes(orjson.dumps(doc))
    return str(path)


@pytest.fixture
def gateway(
    request: pytest.FixtureRequest, demo_repo: Path, tmp_path: Path
) -> Iterator[InProcessServer]:
    doc = request.param
    args = [*KEYS, "--limits", limits_file(tmp_path, doc)] if doc is not None else KEYS
    with InProcessServer(demo_repo, args=args) as s:
        yield s


# -- the rate of 429s ------------------------------------------------------------------------------
RATE, BURST = 20.0, 5
OFFERED = 5 * RATE  # alpha sends at five times its limit
WINDOW_S = 3.0


@pytest.mark.parametrize(
    "gateway", [{"keys": {"alpha": {"requests_per_s": RATE, "burst": BURST}}}], indirect=True
)
def test_a_key_at_five_times_its_limit_is_held_to_it_and_another_key_is_unaffected(
    gateway: InProcessServer,
) -> None:
    """alpha sends Poisson arrivals at 5x its 20/s limit for 3 s; beta, without a rule, sends
    10/s alongside.

    Bounds. A token bucket of capacity B refilled at r admits at most B + r*T requests in T
    seconds (T measured on the server; the client's window from first to last send differs by
    the last request's latency, under 50 ms: one token at 20/s, allowed as +2). It loses tokens
    only while full, and after the first burst drains it is full again only after a gap of
    B/r = 0.25 s without arrivals: at lambda = 100/s that has probability exp(-25) per gap,
    so admitted >= B + r*T - 1 (the token being refilled when the window closes) - 2 for the
    same timing slack. What is random is the number sent, N ~ Poisson(lambda*T) = 300 +- 17:
    the 429 count is N - admitted, so the test checks admitted within those bounds and
    every other request refused; beta gets no 429 at all."""
    rng = random.Random(7)
    schedule: list[tuple[float, dict[str, str]]] = []
    t = 0.0
    while (t := t + rng.expovariate(OFFERED)) < WINDOW_S:
        schedule.append((t, ALPHA))
    schedule += [(k / 10.0, BETA) for k in range(int(WINDOW_S * 10))]
    schedule.sort(key=lambda item: item[0])
    codes: dict[str, list[int]] = {"alpha": [], "beta": []}
    sent_at: list[float] = []
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        start = time.monotonic()
        for at, headers in schedule:
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            r = client.post(INFER, content=ONE, headers=headers)
            who = "alpha" if headers is ALPHA else "beta"
            codes[who].append(r.status_code)
            if who == "alpha":
                sent_at.append(time.monotonic())
            if r.status_code == 429:
                assert r.json()["error"].startswith("over this client's request rate limit")
    span = sent_at[-1] - sent_at[0]
    admitted = codes["alpha"].count(200)
    assert set(codes["alpha"]) == {200, 429}
    assert BURST + RATE * span - 3 <= admitted <= BURST + RATE * span + 2, (admitted, span)
    assert codes["beta"] == [200] * len(codes["beta"])
    assert metric_sum(gateway.url, "turnout_client_requests_total", client="alpha") == len(
        codes["alpha"]
    )
    assert metric_sum(gateway.url, "turnout_requests_total", code="429") == codes["alpha"].count(
        429
    )


# -- the 429 itself ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gateway",
    [
        {
            "default": {"requests_per_s": 2, "burst": 2},
            "keys": {
                "beta": {
                    "requests_per_s": None,
                    "rows_per_s": 4,
                    "rows_burst": 8,
                    "rows_per_day": 20,
                }
            },
        }
    ],
    indirect=True,
)
def test_429_carries_retry_after_and_the_ietf_ratelimit_fields(gateway: InProcessServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert [client.post(INFER, content=ONE, headers=ALPHA).status_code for _ in range(2)] == [
            200,
            200,
        ]
        r = client.post(INFER, content=ONE, headers=ALPHA)
        assert r.status_code == 429
        assert r.json() == {"error": "over this client's request rate limit; retry in 1 s"}
        # at most 0.5 s to the next token at 2/s: a whole second; the bucket holds 2 per 1 s
        assert r.headers["retry-after"] == "1"
        assert r.headers["ratelimit-policy"] == '"requests";q=2;w=1'
        assert r.headers["ratelimit"] == '"requests";r=0;t=1'

        # beta: rows, 8 at once then 4/s, and 20 a day
        assert client.post(INFER, content=rows_body(8), headers=BETA).status_code == 200
        r = client.post(INFER, content=rows_body(4), headers=BETA)
        assert r.status_code == 429
        assert r.headers["ratelimit-policy"] == (
            '"rows";q=8;w=2;qu="rows", "day";q=20;w=86400;qu="rows"'
        )
        assert r.headers["ratelimit"].startswith('"rows";r=')
        assert r.headers["ratelimit"].endswith(";t=1")
        # more rows than the bucket holds can never pass: a 400 that says so, not a 429
        r = client.post(INFER, content=rows_body(9), headers=BETA)
        assert r.status_code == 400
        assert "above this client's rows_burst of 8" in r.json()["error"]


@pytest.mark.parametrize("gateway", [{"keys": {"alpha": {"rows_per_day": 5}}}], indirect=True)
def test_daily_row_quota(gateway: InProcessServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post(INFER, content=rows_body(2), headers=ALPHA).status_code == 200
        assert client.post(INFER, content=rows_body(2), headers=ALPHA).status_code == 200
        r = client.post(INFER, content=rows_body(2), headers=ALPHA)  # 6 > 5
        assert r.status_code == 429
        assert r.json()["error"].startswith("over this client's daily row quota")
        now = dt.datetime.now(dt.UTC)
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        assert abs(int(r.headers["retry-after"]) - (midnight - now).total_seconds()) <= 2
        assert r.headers["ratelimit"].startswith('"day";r=1;t=')
        # a refused request took nothing: one row still fits, then none
        assert client.post(INFER, content=rows_body(1), headers=ALPHA).status_code == 200
        assert client.post(INFER, content=rows_body(1), headers=ALPHA).status_code == 429
        assert client.post(INFER, content=rows_body(1), headers=BETA).status_code == 200


# -- the admin API -----------------------------------------------------------------------------
@pytest.mark.parametrize("gateway", [None], indirect=True)
def test_admin_put_changes_limits_live_and_is_audited(gateway: InProcessServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.get("/admin/limits", headers=ADMIN).json() == {"limits": None}
        assert all(
            client.post(INFER, content=ONE, headers=ALPHA).status_code == 200 for _ in range(5)
        )
        assert client.put("/admin/limits", json={"limits": {}, "reason": "x"}).status_code == 401
        doc = {"keys": {"alpha": {"requests_per_s": 0.01, "burst": 1}}}
        r = client.put("/admin/limits", headers=ADMIN, json={"limits": doc, "reason": "scraper"})
        assert r.status_code == 200, r.text
        assert r.json()["limits"]["keys"]["alpha"] == {"requests_per_s": 0.01, "burst": 1}
        assert client.get("/admin/limits", headers=ADMIN).json() == r.json()
        codes = [client.post(INFER, content=ONE, headers=ALPHA).status_code for _ in range(3)]
        assert codes == [200, 429, 429]
        assert client.post(INFER, content=ONE, headers=BETA).status_code == 200
        entry = client.get("/admin/audit?model=_limits", headers=ADMIN).json()["entries"][0]
        assert (entry["who"], entry["action"], entry["reason"]) == ("tester", "limits", "scraper")
        assert entry["before"] is None and entry["after"] == r.json()["limits"]


BAD = [
    ([], "limits: must be a JSON object"),
    ({"defaults": {}}, "limits.defaults: unknown field"),
    ({"default": {"requests_per_s": -1}}, "limits.default.requests_per_s: must be a number"),
    ({"default": {"requests_per_s": "5"}}, "limits.default.requests_per_s: must be a number"),
    ({"default": {"burst": 1.5}}, "limits.default.burst: must be a positive integer"),
    ({"default": {"rows_per_day": 0}}, "limits.default.rows_per_day: must be a positive integer"),
    ({"keys": {"alpha": {"rps": 1}}}, "limits.keys.alpha.rps: unknown field"),
    ({"keys": {"k" * 129: {}}}, "limits.keys.kkkk"),
    ({"keys": {f"k{i}": {} for i in range(1001)}}, "limits.keys: at most 1000 rules"),
    ({"models": []}, "limits.models: must be an object"),
    ({"models": {"fraud": 5}}, "limits.models.fraud: must be an object"),
]


@pytest.mark.parametrize("gateway", [{"default": {"requests_per_s": 1000}}], indirect=True)
def test_bad_documents_are_400_naming_the_field_and_change_nothing(
    gateway: InProcessServer,
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        before = client.get("/admin/limits", headers=ADMIN).json()
        for doc, message in BAD:
            r = client.put("/admin/limits", headers=ADMIN, json={"limits": doc, "reason": "t"})
            assert r.status_code == 400, (doc, r.text)
            assert r.json()["error"].startswith(message), (doc, r.json())
        for body, message in [
            ({"limits": {}}, "reason: required"),
            ({"reason": "t"}, "limits: required"),
            ({"limits": {}, "reason": "t", "x": 1}, "x: unknown field"),
        ]:
            r = client.put("/admin/limits", headers=ADMIN, json=body)
            assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
        assert client.get("/admin/limits", headers=ADMIN).json() == before
        assert client.get("/admin/audit?model=_limits", headers=ADMIN).json()["entries"] == []


def test_a_bad_limits_file_stops_the_start_naming_the_variable_and_field(
    demo_repo: Path, tmp_path: Path
) -> None:
    path = limits_file(tmp_path, {"default": {"burst": 0}})
    with pytest.raises(SettingsError, match=r"TURNOUT_LIMITS: .*default.burst: must be a positive"):
        serve_settings(["--model-repository", str(demo_repo), "--limits", path], {})
    with pytest.raises(SettingsError, match="TURNOUT_LIMITS: cannot read"):
        serve_settings(["--model-repository", str(demo_repo), "--limits", path + ".x"], {})


# -- the extraction signal ---------------------------------------------------------------------
@pytest.mark.parametrize("gateway", [{"default": {}}], indirect=True)
def test_inputs_outside_the_reference_range_are_counted_per_client(
    gateway: InProcessServer,
) -> None:
    from gateway.demo import sample_inputs

    inside = sample_inputs("fraud", 6, seed=3)["input"]
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for row in inside:
            assert (
                client.post(INFER, content=fraud_body(row.tolist()), headers=BETA).status_code
                == 200
            )
        for k in range(4):  # one feature far beyond anything in the reference sample
            row = np.array(inside[k])
            row[k] = 1e6
            assert (
                client.post(INFER, content=fraud_body(row.tolist()), headers=ALPHA).status_code
                == 200
            )
    values = {
        (name, who): metric_sum(gateway.url, f"turnout_client_inputs_{name}_total", client=who)
        for name in ("checked", "outside")
        for who in ("alpha", "beta", "_other")
    }
    assert values == {
        ("checked", "alpha"): 4, ("outside", "alpha"): 4,
        ("checked", "beta"): 6, ("outside", "beta"): 0,
        ("checked", "_other"): 0, ("outside", "_other"): 0,
    }  # fmt: skip


# -- the fleet ---------------------------------------------------------------------------------
def test_two_replicas_on_one_redis_enforce_one_limit(
    demo_repo: Path, tmp_path: Path, prefix: str
) -> None:
    """Both replicas take from one bucket of 5 refilled at 2/s: over about 2 s of requests spread
    across them, at most 5 + 2*T pass in total (one replica alone would pass that much)."""
    path = limits_file(tmp_path, {"keys": {"alpha": {"requests_per_s": 2, "burst": 5}}})
    args = [*KEYS, "--limits", path, "--redis-url", REDIS_URL, "--redis-prefix", prefix]
    with InProcessServer(demo_repo, args=args) as a, InProcessServer(demo_repo, args=args) as b:
        admitted = {a.url: 0, b.url: 0}
        with httpx.Client(timeout=10) as client:
            start = time.monotonic()
            while time.monotonic() - start < 2.0:
                for s in (a, b):
                    r = client.post(s.url + INFER, content=ONE, headers=ALPHA)
                    assert r.status_code in (200, 429)
                    admitted[s.url] += r.status_code == 200
                time.sleep(0.01)
            span = time.monotonic() - start
        total = sum(admitted.values())
        assert 5 + 2 * span - 2 <= total <= 5 + 2 * span + 1, (admitted, span)
        assert min(admitted.values()) >= 1  # both replicas served from the one bucket


@pytest.mark.system  # two processes: in-process gateways share one fleet member name
def test_redis_failure_falls_back_to_each_replicas_share(demo_repo: Path, tmp_path: Path) -> None:
    path = limits_file(tmp_path, {"keys": {"alpha": {"requests_per_s": 0.001, "burst": 10}}})
    with RedisServer(tmp_path / "redis") as redis:
        args = [*KEYS, "--limits", path, "--redis-url", redis.url]
        a, b = (Server(demo_repo, args=args, wait_ready=False) for _ in range(2))
        try:
            for s in (a, b):
                s.start()
            for s in (a, b):
                s.wait_until_ready()
            until(lambda: metric_sum(a.url, "turnout_rate_limit_replicas") == 2)
            assert metric_sum(a.url, "turnout_rate_limit_fallback") == 0
            redis.stop()
            with httpx.Client(base_url=a.url, timeout=10) as client:
                codes = [
                    client.post(INFER, content=ONE, headers=ALPHA).status_code for _ in range(8)
                ]
                # 10 / 2 replicas = 5 here, then refused on this replica's own bucket
                assert codes == [200] * 5 + [429] * 3
                assert metric_sum(a.url, "turnout_rate_limit_fallback") == 1
                assert "enforcing this replica's share (1/2)" in a.log()
                redis.start()
                # back on Redis (empty after its restart): the fleet's bucket is full again
                until(lambda: client.post(INFER, content=ONE, headers=ALPHA).status_code == 200)
            assert metric_sum(a.url, "turnout_rate_limit_fallback") == 0
        finally:
            for s in (a, b):
                s.stop(timeout=5)


def test_no_limits_no_client_series(server: InProcessServer) -> None:
    text = httpx.get(server.url + "/metrics").text
    assert "turnout_client_" not in text
    assert "turnout_rate_limit_fallback 0.0" in text
    assert math.isfinite(metric_sum(server.url, "turnout_rate_limit_replicas"))


# -- attribution in routing ----------------------------------------------------------------------
@pytest.mark.parametrize("gateway", [None], indirect=True)
def test_a_policy_can_split_by_principal(gateway: InProcessServer) -> None:
    """``"sticky": "principal"``: every request of one API key goes to one arm. The chance that a
    random (non-sticky) split keeps each of alpha's and
    beta's 20 requests on one arm is 2 * 2**-20 each: the test cannot pass by luck. (Each
    test has a gateway of its own: the policy is not removed.)"""
    policy = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, "sticky": "principal"}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        r = client.put("/admin/routes/fraud", headers=ADMIN, json={"policy": policy, "reason": "t"})
        assert r.status_code == 200, r.text
        assert r.json()["policy"]["sticky"] == "principal"
        for headers in (ALPHA, BETA):
            versions = {
                client.post(INFER, content=ONE, headers=headers).json()["model_version"]
                for _ in range(20)
            }
            assert len(versions) == 1, versions
