"""GuardEvaluator in process, on a clock the test holds: windows are deltas between ticks, a
breach writes its change through RouteTable.write with the evidence, a healthy canary advances
after ``advance_after_s``, and a replica without the lease never acts. Real sessions and
monitors (the demo's fraud model), a MemoryStore, counters bumped as the request path bumps
them; no server, no sleeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.background.guards import GuardEvaluator
from gateway.background.shadow import ShadowRunner
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic
from router.policy.spec import CanaryDoc, PolicyDoc, SingleDoc, parse_policy
from router.state.store import MemoryStore
from router.state.table import RouteTable

pytestmark = pytest.mark.anyio

GUARDS = {"window_s": 30, "min_requests": 100, "interval_s": 1, "max_error_ratio": 0.05}


@dataclass
class Parts:
    registry: Registry
    table: RouteTable
    traffic: Traffic
    metrics: GuardMetrics
    shadows: ShadowRunner

    def evaluator(self, table: RouteTable | None = None) -> GuardEvaluator:
        table = table or self.table
        return GuardEvaluator(table, self.registry, self.shadows, self.traffic, GuardMetrics())

    def serve(self, version: str, role: str, ok: int, failed: int = 0) -> None:
        """Count requests as the request path does: (model, version, role, status code)."""
        self.traffic.requests[("fraud", version, role, "200")] += ok
        self.traffic.requests[("fraud", version, role, "500")] += failed


@pytest.fixture
async def parts(registry: Registry) -> AsyncIterator[Parts]:
    shadows = ShadowRunner(registry, 8)
    try:
        yield Parts(registry, RouteTable(MemoryStore()), Traffic(), GuardMetrics(), shadows)
    finally:
        await shadows.close()


async def put(table: RouteTable, doc: PolicyDoc) -> int:
    record = await table.write(
        "fraud", doc, expected=None, who="tester", action="put", reason="test",
        artifacts={"1": "a", "2": "b"},
    )  # fmt: skip
    assert record is not None
    return record.revision


def canary(**extra: object) -> PolicyDoc:
    raw = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25}
    return parse_policy({**raw, "guards": {**GUARDS, **extra}})


async def test_a_failing_candidate_is_rolled_back_with_the_evidence(parts: Parts) -> None:
    revision = await put(parts.table, canary())
    guards = parts.evaluator()
    await guards.tick(100.0)  # the window starts here: nothing judged yet
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 80, failed=20)  # 20 % errors against a 5 % limit
    await guards.tick(100.5)  # before interval_s has passed: no evaluation
    route = parts.table.get("fraud")
    assert route is not None and route.revision == revision
    await guards.tick(101.0)
    route = parts.table.get("fraud")
    assert route is not None and route.revision == revision + 1
    assert route.doc == SingleDoc(version="1", guards=canary().guards)
    entry = (await parts.table.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action) == ("guard:max_error_ratio", "rollback")
    assert entry.details is not None and entry.details["revision"] == revision
    assert entry.details["versions"]["2"] == {
        "requests": 100, "errors": 20, "error_ratio": 0.2, "p99_s": None,
    }  # fmt: skip
    assert guards.metrics.actions[("fraud", "rollback")] == 1


async def test_traffic_before_the_window_starts_is_not_judged(parts: Parts) -> None:
    await put(parts.table, canary())
    parts.serve("2", "candidate", 0, failed=500)  # before the evaluator first saw the policy
    guards = parts.evaluator()
    await guards.tick(100.0)
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 100)
    await guards.tick(101.0)
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, CanaryDoc)
    assert guards.metrics.evaluations[("fraud", "pass")] == 1


async def test_a_healthy_canary_advances_after_advance_after_s(parts: Parts) -> None:
    await put(parts.table, canary(advance_after_s=5))
    guards = parts.evaluator()
    await guards.tick(100.0)
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 100)
    await guards.tick(101.0)  # pass: healthy from here; judged again interval_s (1 s) later
    await guards.tick(105.5)  # healthy 4.5 s; next judged at 106.5
    await guards.tick(106.0)  # between evaluations: nothing happens
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, CanaryDoc) and route.doc.weight == 0.25
    await guards.tick(106.5)  # healthy 5.5 s
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, CanaryDoc) and route.doc.weight == 0.5
    entry = (await parts.table.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action) == ("guard:advance_after_s", "advance")


async def test_only_the_lease_holder_acts(parts: Parts) -> None:
    await put(parts.table, canary())
    other_table = RouteTable(parts.table.store)  # a second replica on the same store
    await other_table.refresh()
    leader, follower = parts.evaluator(), parts.evaluator(other_table)
    await leader.tick(100.0)
    await follower.tick(100.0)
    assert leader.metrics.leader and not follower.metrics.leader
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 50, failed=50)
    await follower.tick(101.0)
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, CanaryDoc)
    assert not follower.metrics.evaluations
    await leader.tick(101.0)
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, SingleDoc)
