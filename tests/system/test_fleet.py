"""Three gateways on one Redis (no shared memory) under load agree: on the policy revision they
serve, on the audit trail, and on the bandit's statistics, whichever replica is asked.
tests/gateway/test_fleet.py covers one change and the feedback join; this adds writes through
every replica under load, racing writers, and identical answers from every replica."""

from __future__ import annotations

import asyncio
import shutil
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
    bounded,
    figures,
    fraud_bodies,
    routes_by,
    until_async,
)
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, Server

CONVERGE_S = 1.0  # docs/routing.md: a change made anywhere is served everywhere within a second
BANDIT: dict[str, Any] = {"strategy": "bandit", "arms": ["1", "2"], "min_share": 0.1}


@dataclass(frozen=True, slots=True)
class Write:
    replica: int
    status: int
    revision: int | None
    reason: str
    at: float  # when the answer arrived


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("fleet-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, demo_repo: Path, redis: RedisServer
) -> Iterator[list[Server]]:
    work = tmp_path_factory.mktemp("fleet")
    shutil.copytree(demo_repo / "fraud", work / "models" / "fraud")
    servers = [
        Server(work / "models", args=["--redis-url", redis.url], wait_ready=False) for _ in range(3)
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_until_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


async def put(
    client: httpx.AsyncClient,
    servers: list[Server],
    i: int,
    policy: dict[str, Any],
    reason: str,
    if_match: int | None = None,
) -> Write:
    headers = dict(ADMIN)
    if if_match is not None:
        headers["If-Match"] = f'"{if_match}"'
    r = await client.put(
        servers[i].url + "/admin/routes/fraud",
        headers=headers,
        json={"policy": policy, "reason": reason},
    )
    revision = r.json().get("revision") if r.status_code == 200 else None
    return Write(i, r.status_code, revision, reason, time.monotonic())


def test_replicas_agree_on_routing_audit_and_bandit_statistics(
    fleet: list[Server], redis: RedisServer
) -> None:
    urls = [s.url for s in fleet]
    shots = [
        Shot(urls[i % 3] + "/v2/models/fraud/infer", body)
        for i, body in enumerate(fraud_bodies(60, seed=71))
    ]

    async def scenario() -> tuple[Load, list[Write], list[Write], list[tuple[Outcome, int]]]:
        async with httpx.AsyncClient(timeout=30) as client:
            writes = [await put(client, fleet, 0, BANDIT | {"seed": 0}, "start")]

            async def converged() -> bool:  # before the load: every replica routes by it
                return all(
                    [await routes_by(client, u, "fraud") == writes[0].revision for u in urls]
                )

            await until_async(converged)
            load = Load(shots, concurrency=9)
            runner = asyncio.create_task(load.run())
            # a change through each replica in turn, under load
            for step in range(1, 7):
                policy = BANDIT | {"seed": step, "min_share": 0.1 + 0.05 * (step % 3)}
                writes.append(await put(client, fleet, step % 3, policy, f"step {step}"))
                await asyncio.sleep(0.4)
            # three writers racing from the same revision: exactly one wins
            current = writes[-1].revision
            race = list(
                await asyncio.gather(
                    *(
                        put(client, fleet, i, BANDIT | {"seed": 10 + i}, f"race {i}", current)
                        for i in range(3)
                    )
                )
            )
            writes += [w for w in race if w.status == 200]
            await asyncio.sleep(2 * CONVERGE_S)
            load.stop.set()
            await runner
            # rewards for the final revision, each posted to a replica other than the one
            # that served it: the join is the fleet's
            final = max(w.revision or 0 for w in writes)
            served = [o for o in load.outcomes if o.revision == final]

            async def reward(o: Outcome) -> tuple[Outcome, int]:
                other = urls[(urls.index(o.shot.url.split("/v2/")[0]) + 1) % 3]
                r = await client.post(
                    other + "/v2/models/fraud/feedback",
                    json={"id": o.request_id, "reward": 1.0 if o.version == "2" else 0.0},
                )
                return o, r.status_code

            # each replica writes its assignments to Redis at its next flush
            keys = [f"turnout:assign:{o.request_id}" for o in served]
            with redis.client() as store:

                async def remembered() -> bool:
                    return bool(store.exists(*keys) == len(keys))

                await until_async(remembered)
            rewards = await bounded(reward(o) for o in served)

            # and pushes the counts and rewards it took at the next: until every replica's
            # report holds them all (at least; the assertions below say exactly)
            async def flushed() -> bool:
                for u in urls:
                    r = await client.get(u + "/admin/routes/fraud/report", headers=ADMIN)
                    rows = r.json()["versions"]
                    if sum(v["served"] for v in rows) < len(served):
                        return False
                    if sum(v["feedback"] for v in rows) < len(rewards):
                        return False
                return True

            await until_async(flushed)
        return load, writes, race, rewards

    load, writes, race, rewards = asyncio.run(scenario())
    figures(
        "fleet",
        sent=load.sent,
        statuses=dict(load.histogram()),
        writes=len(writes),
        race=[w.status for w in race],
        rewards=len(rewards),
    )

    # every request answered, by the revision in force: once a write was acknowledged, every
    # request sent a second later anywhere carries it or a later one
    assert load.sent == len(load.outcomes)
    assert load.histogram() == Counter({200: load.sent})
    for w in writes:
        assert w.revision is not None
        late = [o for o in load.outcomes if o.sent_at > w.at + CONVERGE_S]
        assert all(o.revision is not None and o.revision >= w.revision for o in late)
    assert sorted(w.status for w in race) == [200, 412, 412]

    # routing state: the same answer from every replica
    routes = [httpx.get(u + "/admin/routes", headers=ADMIN).json() for u in urls]
    assert routes[0] == routes[1] == routes[2]
    assert routes[0]["routes"]["fraud"]["revision"] == max(w.revision or 0 for w in writes)

    # audit trail: identical lists, one entry per acknowledged write and nothing else
    trails = [
        httpx.get(u + "/admin/audit?model=fraud&limit=1000", headers=ADMIN).json()["entries"]
        for u in urls
    ]
    assert trails[0] == trails[1] == trails[2]
    assert [(e["revision"], e["reason"], e["who"]) for e in reversed(trails[0])] == [
        (w.revision, w.reason, "tester") for w in writes
    ]

    # bandit statistics of the final revision: identical from every replica, and exact
    assert [status for _, status in rewards] == [200] * len(rewards)
    served = Counter(o.version for o, _ in rewards)
    reports = [httpx.get(u + "/admin/routes/fraud/report", headers=ADMIN).json() for u in urls]
    rows = [{v["version"]: v for v in r["versions"]} for r in reports]
    assert rows[0] == rows[1] == rows[2]
    assert {v: rows[0][v]["served"] for v in rows[0]} == {v: served[v] for v in rows[0]}
    assert {v: rows[0][v]["feedback"] for v in rows[0]} == {v: served[v] for v in rows[0]}
    assert sum(served.values()) >= 30
