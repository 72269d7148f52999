"""Redis restarts empty (no persistence) under two gateways sharing it, while ``fraud`` is
pinned to version 1 and ``beta`` runs a bandit that has learned from feedback.

Taking the empty store's word would drop every policy: ``fraud`` would fall back to its highest
version, 2, without anyone asking. One scenario runs once per module and is recorded; each test
asserts one promise on the record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.load import (
    Load,
    Outcome,
    Shot,
    figures,
    fraud_bodies,
    gateways_on_own_redis,
    metric_sum,
    put_policy,
    routes_by,
    until_async,
)
from tests.support.redis_server import RedisServer
from tests.support.server import TEST_PERIODS, Server

PINNED = {"strategy": "single", "version": "1"}  # the fallback would serve version 2
BANDIT = {"strategy": "bandit", "arms": ["1", "2"], "algorithm": "thompson", "min_share": 0.2}
BODIES = fraud_bodies(40, seed=5)
FLUSH_S = float(TEST_PERIODS["TURNOUT_FLUSH_S"])
STATS = ("rewards", "reward_sum")  # what a replica's bandit holds, and so can put back


@dataclass(frozen=True, slots=True)
class Record:
    load: Load
    servers: tuple[Server, Server]
    revisions: dict[str, int]  # model -> revision of the policy written before the reset
    down_at: float
    up_at: float
    restored_at: float | None  # when the store held both policies again
    learned: dict[str, float]  # beta's bandit totals just before the reset
    store_after: dict[str, Any]  # revision, docs, revs, stats of beta, the audit trail
    change: int  # revision of a policy change made after the restore
    converged: dict[str, str]  # url -> version of fraud each replica serves after the change


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def totals(raw: Mapping[bytes | str, bytes | str]) -> dict[str, float]:
    """The bandit's totals, without zeros: a total of 0 and an absent one are the same (the
    reward script adds 0.0 for a reward of 0; a restore writes only what is not zero)."""
    items = ((text(k), float(v)) for k, v in raw.items())
    return {k: v for k, v in items if k.split(":")[0] in STATS and v != 0.0}


async def scenario(a: Server, b: Server, server: RedisServer) -> Record:
    store = server.client()
    async with httpx.AsyncClient(timeout=30) as client:
        revisions = {
            "fraud": await put_policy(client, a.url, "fraud", PINNED),
            "beta": await put_policy(client, a.url, "beta", BANDIT),
        }

        async def b_routes_by_both() -> bool:  # within a second (tests/system/test_fleet.py)
            return all([await routes_by(client, b.url, m) == r for m, r in revisions.items()])

        await until_async(b_routes_by_both)
        for i, body in enumerate(BODIES):  # beta learns that version 2 pays
            url = (a.url, b.url)[i % 2]
            answer = (await client.post(url + "/v2/models/beta/infer", content=body)).json()
            reward = 1.0 if answer["model_version"] == "2" else 0.0
            r = await client.post(
                url + "/v2/models/beta/feedback", json={"id": answer["id"], "reward": reward}
            )
            assert r.status_code == 200, r.text
        # Each replica pushes the rewards it took at its next flush, then folds the fleet's
        # totals into its bandit at the end of that flush tick.
        stats_key = f"turnout:stats:{revisions['beta']}:beta"

        async def all_rewards_stored() -> bool:
            stored = totals(store.hgetall(stats_key))
            return stored.get("rewards:1", 0) + stored.get("rewards:2", 0) >= len(BODIES)

        await until_async(all_rewards_stored)
        await asyncio.sleep(10 * FLUSH_S)  # folding is not observable: ten flush ticks for it
        learned = totals(store.hgetall(stats_key))

        shots = [
            Shot((a.url, b.url)[i % 2] + "/v2/models/fraud/infer", body)
            for i, body in enumerate(BODIES)
        ]
        load = Load(shots, concurrency=4)
        runner = asyncio.create_task(load.run())
        await asyncio.sleep(1.0)
        server.stop()
        down_at = time.monotonic()
        await asyncio.sleep(1.0)
        server.start()  # same port, nothing kept
        up_at = time.monotonic()
        restored_at = None
        while restored_at is None and time.monotonic() - up_at < 10:
            if store.hlen("turnout:docs") == 2:
                restored_at = time.monotonic()
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        load.stop.set()
        await runner
        store_after = {
            "revision": int(store.get("turnout:revision") or 0),
            "docs": {text(k): orjson.loads(v) for k, v in store.hgetall("turnout:docs").items()},
            "revs": {text(k): int(v) for k, v in store.hgetall("turnout:revs").items()},
            "stats": totals(store.hgetall(f"turnout:stats:{revisions['beta']}:beta")),
            "audit": [orjson.loads(e) for e in store.lrange("turnout:audit", 0, -1)],
        }

        change = await put_policy(client, b.url, "fraud", {"strategy": "single", "version": "2"})
        converged: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while len(converged) < 2 and time.monotonic() < deadline:
            for url in (a.url, b.url):
                r = await client.post(url + "/v2/models/fraud/infer", content=BODIES[0])
                answer = r.json()
                if answer.get("parameters", {}).get("policy_revision") == change:
                    converged[url] = answer["model_version"]
            await asyncio.sleep(0.02)
    store.close()
    return Record(
        load, (a, b), revisions, down_at, up_at, restored_at, learned, store_after, change,
        converged,
    )  # fmt: skip


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Iterator[Record]:
    with gateways_on_own_redis(tmp_path_factory.mktemp("reset"), demo_repo) as ((a, b), redis):
        reset = asyncio.run(scenario(a, b, redis))
        figures(
            "redis reset",
            sent=reset.load.sent,
            statuses=dict(reset.load.histogram()),
            versions=sorted({o.version for o in reset.load.outcomes if o.version}),
            restored_s=None if reset.restored_at is None else reset.restored_at - reset.up_at,
        )
        yield reset


def between(record: Record, o: Outcome) -> bool:
    return record.down_at <= o.sent_at and (record.restored_at or o.sent_at) >= o.sent_at


def test_traffic_stays_on_the_policy_through_the_reset(record: Record) -> None:
    outcomes = record.load.outcomes
    assert sum(1 for o in outcomes if between(record, o)) >= 20, "too little traffic in the reset"
    assert {(o.status, o.version) for o in outcomes} == {(200, "1")}


def test_the_store_gets_the_policies_back_under_their_revisions(record: Record) -> None:
    assert record.restored_at is not None, "the store never held the policies again"
    assert record.restored_at - record.up_at < 3.0  # watch backoff ≤ 0.5 s, reconcile 1 s
    after = record.store_after
    assert after["docs"] == {"fraud": PINNED, "beta": BANDIT}
    assert after["revs"] == record.revisions
    assert after["revision"] == max(record.revisions.values())


def test_one_replica_restores_and_both_the_audit_trail_and_metrics_say_so(record: Record) -> None:
    trail = record.store_after["audit"]
    assert sorted((e["model"], e["action"], e["revision"]) for e in trail) == sorted(
        (model, "restore", revision) for model, revision in record.revisions.items()
    )
    assert len({e["who"] for e in trail}) == 1 and trail[0]["who"].startswith("restore:")
    assert all(e["before"] is None and "revision 0" in e["reason"] for e in trail)
    resets = [metric_sum(s.url, "turnout_store_resets_total") for s in record.servers]
    assert 1 <= sum(resets) <= 2 and max(resets) == 1  # each replica that saw it, once


def test_a_bandit_keeps_what_it_learned(record: Record) -> None:
    learned = record.learned
    assert learned["rewards:1"] + learned["rewards:2"] == len(BODIES)
    assert record.store_after["stats"] == pytest.approx(learned)


def test_policy_changes_after_the_reset_continue_the_revisions(record: Record) -> None:
    assert record.change == max(record.revisions.values()) + 1
    assert record.converged == {s.url: "2" for s in record.servers}
