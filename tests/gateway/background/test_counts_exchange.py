"""CountsExchange in process: the views a scrape and the drift endpoint read. A second member
is published into the same store exactly as its own exchange would publish it."""

from __future__ import annotations

import pytest

from gateway.background.fleet import CountsExchange
from gateway.serving.registry import Registry
from gateway.serving.statistics import Figures
from gateway.serving.traffic import Traffic
from router.state.store import MemoryStore

pytestmark = pytest.mark.anyio
KEY = ("fraud", "1", "primary", "200")


def exchange(store: MemoryStore, registry: Registry, traffic: Traffic) -> CountsExchange:
    return CountsExchange(store, registry, traffic, shared=True, workers=1)


async def test_the_fleet_view_adds_every_live_member(registry: Registry) -> None:
    store = MemoryStore()
    mine, theirs = Traffic(), Traffic()
    mine.requests[KEY] += 3
    theirs.requests[KEY] += 5
    theirs.inflight["fraud"] += 2
    me, other = exchange(store, registry, mine), exchange(store, registry, theirs)
    await store.publish_counts("other-host:1:1", other.blobs(0.0), ttl_s=5.0)
    fleet = await me.view("fleet")
    assert fleet.members == 2
    assert fleet.requests[KEY] == 8 and fleet.inflight["fraud"] == 2
    assert set(fleet.monitors) == {("fraud", v) for v in registry.ready_versions("fraud")}
    process = await me.view("process")
    assert process.members == 1 and process.requests[KEY] == 3


async def test_a_single_worker_group_is_the_process_and_its_own_publish_is_not_counted_twice(
    registry: Registry,
) -> None:
    store = MemoryStore()
    traffic = Traffic()
    traffic.requests[KEY] += 4
    me = exchange(store, registry, traffic)
    await store.publish_counts(me.member, me.blobs(0.0), ttl_s=5.0)
    assert (await me.view("group")).requests[KEY] == 4
    assert (await me.view("fleet")).requests[KEY] == 4


async def test_unreadable_counters_of_another_member_are_skipped(registry: Registry) -> None:
    store = MemoryStore()
    traffic = Traffic()
    traffic.requests[KEY] += 1
    me = exchange(store, registry, traffic)
    blobs = {"traffic": b"not json", "monitor/fraud/1": b"\x00garbage"}
    await store.publish_counts("other-host:1:1", blobs, ttl_s=5.0)
    fleet = await me.view("fleet")
    assert fleet.members == 2 and fleet.requests[KEY] == 1


async def test_the_fleet_view_adds_every_members_runtime_statistics(registry: Registry) -> None:
    store = MemoryStore()
    me = exchange(store, registry, Traffic())
    theirs = Figures(succeeded=4, succeeded_s=0.5, inferences=9, executions=3, last_ms=7)
    theirs.sizes[3] = [3, 0.0, 0.25, 0.0]
    await store.publish_counts(
        "other-host:1:1", {"runtime/fraud/1": theirs.to_bytes(), "runtime/fraud/2": b"[1"}, 5.0
    )
    fleet = await me.view("fleet")
    mine = (await me.view("process")).runtimes[("fraud", "1")]
    added = fleet.runtimes[("fraud", "1")]
    assert added.succeeded == mine.succeeded + 4
    assert added.inferences == mine.inferences + 9
    assert added.sizes[3][0] == mine.sizes.get(3, [0.0])[0] + 3
    assert added.last_ms == max(mine.last_ms, 7)
    # the unreadable blob is skipped: version 2 is this process's alone
    assert fleet.runtimes[("fraud", "2")] == (await me.view("process")).runtimes[("fraud", "2")]
