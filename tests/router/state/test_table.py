"""RouteTable over a MemoryStore, in process: the one write path, replicas that share a store,
the feedback join, and the store that lost its state. No server, no sleeps: refresh and flush
are called directly, as the table's own tasks call them."""

from __future__ import annotations

import pytest

from router.policy.policies import PolicyError
from router.policy.spec import PolicyDoc, SingleDoc, parse_policy
from router.state.store import MemoryStore, StaleRevision
from router.state.table import RouteTable, UnknownInference

pytestmark = pytest.mark.anyio

CANARY = parse_policy({"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25})
BANDIT = parse_policy({"strategy": "bandit", "arms": ["1", "2"], "seed": 1})
ARTIFACTS = {"1": "a" * 64, "2": "b" * 64}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def write(table: RouteTable, doc: PolicyDoc | None, expected: int | None = None) -> int:
    record = await table.write(
        "fraud",
        doc,
        expected=expected,
        who="tester",
        action="put",
        reason="test",
        artifacts=ARTIFACTS,
    )
    return record.revision if record is not None else 0


async def test_write_installs_at_once_and_audits_the_artifacts() -> None:
    table = RouteTable(MemoryStore(), shared=False)
    revision = await write(table, CANARY)
    route = table.get("fraud")
    assert route is not None and route.revision == revision and route.doc == CANARY
    assert route.policy.shares() == {"1": 0.75, "2": 0.25}
    (entry,) = await table.store.audit("fraud")
    assert (entry.who, entry.action, entry.artifacts) == ("tester", "put", ARTIFACTS)
    assert entry.after == CANARY.as_json()


async def test_a_stale_write_changes_nothing() -> None:
    table = RouteTable(MemoryStore(), shared=False)
    revision = await write(table, CANARY)
    with pytest.raises(StaleRevision):
        await write(table, SingleDoc(version="1"), expected=revision - 1)
    route = table.get("fraud")
    assert route is not None and route.doc == CANARY and len(await table.store.audit()) == 1


async def test_a_replica_on_the_same_store_serves_the_change_after_refresh() -> None:
    store = MemoryStore()
    writer, reader = RouteTable(store), RouteTable(store)
    await write(writer, CANARY)
    assert reader.get("fraud") is None
    await reader.refresh()
    route = reader.get("fraud")
    assert route is not None and route.doc == CANARY
    await write(writer, None, expected=route.revision)
    await reader.refresh()
    assert reader.get("fraud") is None


async def test_feedback_joins_the_served_version_once_per_reward_and_reaches_the_store() -> None:
    table = RouteTable(MemoryStore(), shared=False)
    await write(table, BANDIT)
    route = table.get("fraud")
    assert route is not None
    decisions = {f"req-{i}": table.choose(route, {}, {}) for i in range(50)}
    for request_id, decision in decisions.items():
        table.served(route, decision, request_id)
    for request_id, decision in decisions.items():
        assignment, duplicate = await table.feedback(
            "fraud", request_id, 1.0 if decision.version == "2" else 0
        )
        assert assignment.version == decision.version and not duplicate
    with pytest.raises(UnknownInference):
        await table.feedback("fraud", "never-served", 1.0)
    with pytest.raises(UnknownInference):
        await table.feedback("other-model", "req-0", 1.0)
    with pytest.raises(PolicyError):
        await table.feedback("fraud", "req-0", 2.0)  # a bandit reward is in [0, 1]
    await table.flush()
    stats = await table.store.stats("fraud", route.revision)
    served = {v: s.served for v, s in stats.items()}
    assert sum(served.values()) == 50
    assert stats["2"].reward_sum == stats["2"].rewards == served.get("2", 0)


async def test_a_store_that_lost_its_state_gets_the_replicas_copy_back() -> None:
    table = RouteTable(MemoryStore(), shared=False)
    revision = await write(table, CANARY)
    table.store = MemoryStore()  # the store restarted empty: revision 0, no policies
    await table.refresh()
    assert table.store_resets == 1
    found, records = await table.store.routes()
    assert found == revision and records["fraud"].doc == CANARY.as_json()
    route = table.get("fraud")
    assert route is not None and route.doc == CANARY
