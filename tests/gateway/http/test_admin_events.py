"""The event stream through real gateways: GET /admin/events (viewer role, newest first, paged,
kind filter, hostile query values), the events that exist today (model.*, policy.changed by a
person, drift.changed from live traffic) at a real signing-checking sink, the metrics, a
restart with a file outbox, and two gateways on one Redis delivering each event once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.demo import sample_inputs
from tests.conftest import REDIS_URL
from tests.support.event_sink import EventSink
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, InProcessServer

SECRET = "sink-secret-0123456789abcdef"
VIEWER = {"Authorization": "Bearer viewer-token-0123456789"}
VIEWER_ARG = ["--admin-token", "vera:viewer=viewer-token-0123456789"]


def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def sinks_file(tmp_path: Path, sink: EventSink, **extra: Any) -> Path:
    path = tmp_path / "sinks.json"
    path.write_text(json.dumps([sink.config(**extra)]))
    return path


@pytest.fixture(scope="module")
def sink() -> Iterator[EventSink]:
    with EventSink(SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    demo_repo: Path, sink: EventSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    path = sinks_file(tmp_path_factory.mktemp("sinks"), sink)
    args = ["--event-sinks", str(path), "--drift-window-s", "60", *VIEWER_ARG]
    with InProcessServer(demo_repo, args=args) as s:
        yield s


def listed(gateway: InProcessServer, **params: Any) -> dict[str, Any]:
    r = httpx.get(gateway.url + "/admin/events", params=params, headers=VIEWER)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def put(url: str, version: str, reason: str) -> None:
    policy = {"strategy": "single", "version": version}
    r = httpx.put(
        url + "/admin/routes/fraud", json={"policy": policy, "reason": reason}, headers=ADMIN
    )
    assert r.status_code == 200, r.text


def test_model_loads_are_events(gateway: InProcessServer, sink: EventSink) -> None:
    loaded = listed(gateway, kind="model.loaded", limit=1000)["events"]
    subjects = {e["subject"] for e in loaded}
    assert {"fraud/1", "fraud/2"} <= subjects
    assert all(e["data"]["replica"] and len(e["data"]["sha256"]) == 64 for e in loaded)
    until(lambda: {"fraud/1", "fraud/2"} <= {e["subject"] for e in sink.taken()})
    assert not sink.bad


def test_a_policy_change_by_a_person_is_an_event(gateway: InProcessServer, sink: EventSink) -> None:
    put(gateway.url, "2", "events: a person's change")
    (event,) = listed(gateway, kind="policy.changed", limit=1)["events"]
    revision = httpx.get(gateway.url + "/admin/routes/fraud", headers=ADMIN).json()["revision"]
    assert event["subject"] == "fraud" and event["type"] == "dev.turnout.policy.changed"
    assert event["data"] == {
        "who": "tester",
        "why": "events: a person's change",
        "revision": revision,
        "policy": "single",
        "action": "put",
    }
    until(lambda: event["id"] in {e["id"] for e in sink.taken()})
    r = httpx.request(
        "DELETE", gateway.url + "/admin/routes/fraud", json={"reason": "gone"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    (deleted,) = listed(gateway, kind="policy.changed", limit=1)["events"]
    assert deleted["data"]["revision"] == revision + 1 and deleted["data"]["policy"] is None


def test_listing_is_newest_first_and_pages_on(gateway: InProcessServer) -> None:
    for i in range(5):
        put(gateway.url, str(1 + i % 2), f"paging {i}")
    first = listed(gateway, limit=2, kind="policy.*")
    assert [e["data"]["why"] for e in first["events"]] == ["paging 4", "paging 3"]
    seen = [e["id"] for e in first["events"]]
    cursor = first["next"]
    while cursor is not None:
        page = listed(gateway, limit=2, kind="policy.*", cursor=cursor)
        seen += [e["id"] for e in page["events"]]
        cursor = page["next"]
    everything = listed(gateway, limit=1000, kind="policy.changed")["events"]
    assert seen == [e["id"] for e in everything] and len(seen) >= 5
    times = [e["time"] for e in everything]
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"limit": "9" * 5000}, "limit"),
        ({"cursor": ""}, "cursor"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "0"}, "cursor"),
        ({"kind": "model.exploded"}, "kind"),
        ({"kind": "x" * 10_000}, "kind"),
        ({"kind": ""}, "kind"),
    ],
)
def test_hostile_query_values_are_a_400_naming_the_field(
    gateway: InProcessServer, params: dict[str, str], field: str
) -> None:
    r = httpx.get(gateway.url + "/admin/events", params=params, headers=VIEWER)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"{field}: ")
    assert len(r.text) < 2000  # no echo of a huge value


def test_listing_needs_a_token(gateway: InProcessServer) -> None:
    assert httpx.get(gateway.url + "/admin/events").status_code == 401


def test_drift_in_live_traffic_is_an_event(
    gateway: InProcessServer, sink: EventSink, demo_repo: Path
) -> None:
    reference = np.load(demo_repo / "fraud" / "1" / "reference.npy")
    shift = np.zeros(reference.shape[1], dtype=np.float32)
    shift[0] = 5.0 * reference[:, 0].std()
    put(gateway.url, "1", "drift test")
    with httpx.Client(timeout=10.0) as client:
        for seed in range(15):
            rows = (sample_inputs("fraud", 100, seed)["input"] + shift).astype(np.float32)
            body = {
                "inputs": [
                    {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                     "data": rows.ravel().tolist()}
                ]
            }  # fmt: skip
            r = client.post(gateway.url + "/v2/models/fraud/infer", json=body)
            assert r.status_code == 200, r.text

    def drifted() -> list[dict[str, Any]]:
        return [e for e in sink.taken() if e["type"] == "dev.turnout.drift.changed"]

    until(lambda: any(e["subject"].startswith("fraud/1/") for e in drifted()))
    event = next(e for e in drifted() if e["subject"].startswith("fraud/1/"))
    assert event["data"]["from"] == "stable" and event["data"]["to"] in ("watch", "act")
    assert event["data"]["psi"] > 0.1 and event["data"]["column"] == "feature"
    feature = event["subject"].split("/")[2]
    time.sleep(0.5)  # several ticks: a status that holds is not announced again
    assert sum(e["subject"] == event["subject"] for e in drifted()) == 1, feature


def test_metrics_count_emitted_and_delivered(gateway: InProcessServer, sink: EventSink) -> None:
    put(gateway.url, "1", "metrics")
    until(lambda: "metrics" in {e["data"].get("why") for e in sink.taken()})
    until(lambda: 'turnout_event_outbox_depth{sink="test"} 0.0' in metrics(gateway))
    text = metrics(gateway)
    assert 'turnout_events_emitted_total{kind="policy.changed"}' in text
    assert 'turnout_events_dropped_total{reason="outbox_full"} 0.0' in text
    delivered = [
        line
        for line in text.splitlines()
        if line.startswith('turnout_event_deliveries_total{outcome="delivered",sink="test"}')
        or line.startswith('turnout_event_deliveries_total{sink="test",outcome="delivered"}')
    ]
    assert delivered and float(delivered[0].split()[-1]) >= 1
    assert 'turnout_event_outbox_oldest_age_seconds{sink="test"} 0.0' in text


def metrics(gateway: InProcessServer) -> str:
    return httpx.get(gateway.url + "/metrics").text


def test_a_file_outbox_keeps_events_across_a_restart(demo_repo: Path, tmp_path: Path) -> None:
    sink = EventSink(SECRET)  # not started: down
    args = ["--event-sinks", str(sinks_file(tmp_path, sink)), "--events-dir", str(tmp_path / "ev")]
    with InProcessServer(demo_repo, args=args) as first:
        put(first.url, "2", "while the sink is down")
        ids = [e["id"] for e in listed_admin(first)]
    with sink, InProcessServer(demo_repo, args=args) as second:
        until(lambda: set(ids) <= {e["id"] for e in sink.taken()})
        # the first run's events, the second's loads, and no event twice
        taken = [e["id"] for e in sink.taken()]
        assert len(taken) == len(set(taken))
        assert {e["id"] for e in listed_admin(second)} >= set(ids)


def listed_admin(gateway: InProcessServer) -> list[dict[str, Any]]:
    r = httpx.get(gateway.url + "/admin/events", params={"limit": 1000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def test_two_gateways_on_one_redis_deliver_each_event_once(
    demo_repo: Path, tmp_path: Path, prefix: str
) -> None:
    with EventSink(SECRET) as sink:
        args = ["--event-sinks", str(sinks_file(tmp_path, sink)), "--redis-url", REDIS_URL,
                "--redis-prefix", prefix]  # fmt: skip
        with InProcessServer(demo_repo, args=args) as a, InProcessServer(demo_repo, args=args) as b:
            for i in range(6):
                put((a, b)[i % 2].url, str(1 + i % 2), f"fleet {i}")
            until(lambda: sum(e["type"].endswith("policy.changed") for e in sink.taken()) >= 6)
            time.sleep(0.5)  # time for a duplicate, were there one
            listing = listed_admin(a)
        taken = sink.taken()
    ids = [e["id"] for e in taken]
    assert len(ids) == len(set(ids))
    changes = [e["data"]["why"] for e in taken if e["type"].endswith("policy.changed")]
    assert changes == [f"fleet {i}" for i in range(6)]
    # each replica loads for itself and says so: one model.loaded per version and replica
    loaded = "dev.turnout.model.loaded"
    loads = [(e["subject"], e["data"]["replica"]) for e in taken if e["type"] == loaded]
    assert len(loads) == len(set(loads)) and len({r for _, r in loads}) == 2
    # a gateway lists the fleet's one stream (all but the unloads of the shutdown after)
    before = {e["id"] for e in taken if e["type"] != "dev.turnout.model.unloaded"}
    assert {e["id"] for e in listing} >= before


def test_a_bad_sinks_file_stops_the_start(demo_repo: Path, tmp_path: Path) -> None:
    from gateway.cli import serve_settings
    from gateway.settings import SettingsError

    path = tmp_path / "sinks.json"
    path.write_text(json.dumps([{"name": "x", "url": "ftp://nope", "secret": "s" * 16}]))
    with pytest.raises(SettingsError, match=r"--event-sinks: .*url: must be an http"):
        serve_settings(["--model-repository", str(demo_repo), "--event-sinks", str(path)], {})


def test_listing_while_redis_hangs_is_a_503(demo_repo: Path, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        args = ["--redis-url", redis.url]
        with InProcessServer(demo_repo, args=args) as gateway:
            assert listed_admin(gateway)  # the loads
            redis.pause()
            try:
                r = httpx.get(gateway.url + "/admin/events", headers=ADMIN, timeout=10)
            finally:
                redis.resume()
            assert r.status_code == 503, r.text
            assert r.json()["error"].startswith("event outbox unavailable: ")
