"""Redis hangs mid-load under two gateways sharing it (a bandit on ``fraud``).

One scenario runs once per module and is recorded; each test asserts one promise on the record.
The outage is a SIGSTOP of the test's own redis-server: connections still open (the kernel
accepts them) but no command is answered, so every store call times out: the hardest case for a
client, since a command sent during the outage runs when Redis resumes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.load import (
    Load,
    Outcome,
    Shot,
    figures,
    fraud_bodies,
    gateways_on_own_redis,
    put_policy,
    routes_by,
    until_async,
)
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, Server

BANDIT = {"strategy": "bandit", "arms": ["1", "2"], "algorithm": "thompson", "min_share": 0.2}
OUTAGE_S = 3.5
RECONVERGE_S = 2.0
BODIES = fraud_bodies(64, seed=21)


@dataclass(frozen=True, slots=True)
class Record:
    load: Load
    servers: tuple[Server, Server]
    bandit_revision: int
    paused_at: float
    resumed_at: float
    writes: list[httpx.Response]  # admin writes sent during the outage
    rewards: list[tuple[Outcome, int, int]]  # feedback to the replica that served: during, after
    retried: list[tuple[Outcome, int, int]]  # feedback to the other replica: during, after
    converged_after: dict[str, float]  # url -> seconds from resume until it served `change`
    change: int  # the revision of the policy change made once Redis was back


def feedback_url(served: Outcome, other: str | None = None) -> str:
    base = served.shot.url.split("/v2/")[0] if other is None else other
    return base + "/v2/models/fraud/feedback"


def reward_of(served: Outcome) -> float:
    return 1.0 if served.version == "2" else 0.0


async def scenario(a: Server, b: Server, redis: RedisServer) -> Record:
    urls = [a.url, b.url]
    async with httpx.AsyncClient(timeout=30) as client:
        revision = await put_policy(client, a.url, "fraud", BANDIT)

        async def b_routes_by_it() -> bool:  # within a second (tests/system/test_fleet.py)
            return await routes_by(client, b.url, "fraud") == revision

        await until_async(b_routes_by_it)
        shots = [
            Shot(urls[i % 2] + "/v2/models/fraud/infer", body) for i, body in enumerate(BODIES)
        ]
        load = Load(shots, concurrency=8)
        runner = asyncio.create_task(load.run())

        async def served(n: int) -> bool:
            return sum(1 for o in load.outcomes if o.status == 200) >= n

        await until_async(lambda: served(60))
        before = [o for o in load.outcomes if o.status == 200]
        assert len(before) >= 60, "too little traffic before the outage"

        redis.pause()
        paused_at = time.monotonic()
        writes = list(
            await asyncio.gather(
                *(
                    client.put(
                        f"{url}/admin/routes/beta",
                        headers=ADMIN,
                        json={"policy": {"strategy": "single", "version": "1"}, "reason": "outage"},
                    )
                    for url in urls
                )
            )
        )
        local, remote = before[:40], before[40:60]
        # Rewards arrive once each replica's first flush of the outage has timed out (1 s), so
        # none of them rides in the one write whose fate is in doubt (see router/table.py).
        await asyncio.sleep(paused_at + 1.5 - time.monotonic())

        async def reward(served: Outcome, other: str | None = None) -> int:
            r = await client.post(
                feedback_url(served, other),
                json={"id": served.request_id, "reward": reward_of(served)},
            )
            return r.status_code

        def other(o: Outcome) -> str:
            return b.url if o.shot.url.startswith(a.url) else a.url

        statuses = await asyncio.gather(*(reward(o) for o in local))
        refused = await asyncio.gather(*(reward(o, other(o)) for o in remote))
        await asyncio.sleep(paused_at + OUTAGE_S - time.monotonic())
        redis.resume()
        resumed_at = time.monotonic()

        # a policy change right after recovery, on another model: both replicas serve it soon
        change = await put_policy(client, a.url, "beta", {"strategy": "single", "version": "2"})
        converged: dict[str, float] = {}
        beta = BODIES[0]
        while len(converged) < 2 and time.monotonic() - resumed_at < 10:
            for url in urls:
                if url not in converged:
                    r = await client.post(url + "/v2/models/beta/infer", content=beta)
                    if r.json().get("parameters", {}).get("policy_revision") == change:
                        converged[url] = time.monotonic() - resumed_at
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        load.stop.set()
        await runner
        # buffered assignments reach Redis at each replica's next flush
        store = redis.client()
        keys = [f"turnout:assign:{o.request_id}" for o in remote]

        async def remembered() -> bool:
            return bool(store.exists(*keys) == len(keys))

        await until_async(remembered)
        after = await asyncio.gather(*(reward(o, other(o)) for o in remote))
        again = await asyncio.gather(*(reward(o) for o in local))
        # and so do the counts and the rewards each replica took: wait until each replica's
        # report holds them (at least: the tests check they are counted exactly once)
        rewarded = len(local) + len(remote)
        answered = sum(1 for o in load.outcomes if o.revision == revision)

        async def flushed() -> bool:
            for url in urls:
                r = await client.get(url + "/admin/routes/fraud/report", headers=ADMIN)
                rows = r.json()["versions"]
                if sum(v["served"] for v in rows) < answered:
                    return False
                if sum(v["feedback"] for v in rows) < rewarded:
                    return False
            return True

        await until_async(flushed)
        store.close()
    return Record(
        load=load,
        servers=(a, b),
        bandit_revision=revision,
        paused_at=paused_at,
        resumed_at=resumed_at,
        writes=writes,
        rewards=list(zip(local, statuses, again, strict=True)),
        retried=list(zip(remote, refused, after, strict=True)),
        converged_after=converged,
        change=change,
    )


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Iterator[Record]:
    with gateways_on_own_redis(tmp_path_factory.mktemp("outage"), demo_repo) as ((a, b), redis):
        outage = asyncio.run(scenario(a, b, redis))
        load = outage.load
        figures(
            "redis outage",
            sent=load.sent,
            during=sum(1 for o in load.outcomes if during(outage, o)),
            statuses=dict(load.histogram()),
            writes=[w.status_code for w in outage.writes],
            rewards=len(outage.rewards) + len(outage.retried),
            converged_s=max(outage.converged_after.values(), default=None),
        )
        yield outage


def during(record: Record, o: Outcome) -> bool:
    return record.paused_at <= o.sent_at and o.done_at <= record.resumed_at


def test_inference_keeps_serving_on_the_last_known_policy(record: Record) -> None:
    load = record.load
    assert load.sent == len(load.outcomes)
    assert load.histogram() == Counter({200: load.sent})
    outage = [o for o in load.outcomes if during(record, o)]
    assert len(outage) >= 100, "too little traffic during the outage"
    assert {o.revision for o in outage} == {record.bandit_revision}
    assert {o.version for o in outage} == {"1", "2"}


def test_admin_writes_during_the_outage_answer_503_and_change_nothing(record: Record) -> None:
    assert [w.status_code for w in record.writes] == [503, 503]
    assert all("unavailable" in w.json()["error"] for w in record.writes)
    # After recovery, the fleet's trail holds the writes made outside the outage only.
    trails = [
        httpx.get(s.url + "/admin/audit", headers=ADMIN).json()["entries"] for s in record.servers
    ]
    assert trails[0] == trails[1]
    assert [(e["model"], e["revision"]) for e in trails[0]] == [
        ("beta", record.change),
        ("fraud", record.bandit_revision),
    ]
    for s in record.servers:
        route = httpx.get(s.url + "/admin/routes/beta", headers=ADMIN).json()
        assert route["revision"] == record.change


def reports(record: Record) -> list[dict[str, dict[str, Any]]]:
    """Each replica's report of the bandit's revision: version -> row."""
    out = []
    for s in record.servers:
        report = httpx.get(s.url + "/admin/routes/fraud/report", headers=ADMIN).json()
        assert report["revision"] == record.bandit_revision
        out.append({v["version"]: v for v in report["versions"]})
    return out


def test_rewards_posted_during_the_outage_are_counted_exactly_once(record: Record) -> None:
    # A reward needs the store, which takes each id's one reward fleet-wide: refused while it
    # is out, so the caller knows to retry; accepted once it is back (a claim in doubt that ran
    # when Redis resumed answers the retry as a duplicate: counted once either way).
    assert {(d, a) for _, d, a in record.rewards} == {(503, 200)}
    assert {(d, a) for _, d, a in record.retried} == {(503, 200)}
    rewarded = [o for o, _, _ in record.rewards] + [o for o, _, _ in record.retried]
    feedback = Counter(o.version for o in rewarded)
    for rows in reports(record):
        assert {v: rows[v]["feedback"] for v in ("1", "2")} == {v: feedback[v] for v in ("1", "2")}
        assert rows["1"]["reward_mean"] == 0.0 and rows["2"]["reward_mean"] == 1.0


def test_requests_served_during_the_outage_are_counted_exactly_once(record: Record) -> None:
    served = Counter(
        o.version for o in record.load.outcomes if o.revision == record.bandit_revision
    )
    for rows in reports(record):
        assert {v: rows[v]["served"] for v in ("1", "2")} == {v: served[v] for v in ("1", "2")}


def test_replicas_reconverge_within_two_seconds_of_recovery(record: Record) -> None:
    assert set(record.converged_after) == {s.url for s in record.servers}
    assert max(record.converged_after.values()) < RECONVERGE_S, record.converged_after
