"""RolloutEngine in process, on a clock the test holds: a template starts a rollout of the newer
READY version, shadows it, walks it through its steps and promotes it; approval holds it and a
rejection rolls it back; a guard's rollback or a person's change ends it; the confirm webhook (a
real HTTP server) holds the promotion until it answers 2xx; on Redis only the lease holder
drives, and another replica takes over when the leader stops. Real sessions (the demo's fraud
model, versions 1 and 2), real stores; no server for the gateway, no mocks."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.background.fleet import CountsExchange
from gateway.background.guards import GuardEvaluator
from gateway.background.quality import Quality
from gateway.background.rollout import RolloutEngine
from gateway.background.shadow import ShadowRunner
from gateway.errors import Conflict
from gateway.serving.loader import version_loader
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic
from gateway.settings import Settings
from router.policy.rollout_spec import Rollout
from router.policy.spec import CanaryDoc, ShadowSpec, SingleDoc, parse_policy
from router.state.outcomes import MemoryPredictions
from router.state.redis_store import RedisStore
from router.state.store import MemoryStore, StateStore
from router.state.table import RouteTable
from tests.support.redis_server import flush_prefix, fresh_prefix
from tests.support.server import reference_cache

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
GUARDS = {"window_s": 30, "min_requests": 100, "interval_s": 1, "max_error_ratio": 0.05}


@dataclass
class Events:
    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        self.seen.append((kind, subject, dict(data)))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.seen]


@dataclass
class Parts:
    registry: Registry
    table: RouteTable
    traffic: Traffic
    shadows: ShadowRunner
    events: Events
    guards: GuardEvaluator

    def engine(self, table: RouteTable | None = None, lease_ttl_s: float = 3.0) -> RolloutEngine:
        return RolloutEngine(
            table or self.table, self.registry, self.guards, emit=self.events,
            lease_ttl_s=lease_ttl_s,
        )  # fmt: skip

    @property
    def store(self) -> StateStore:
        return self.table.store

    def serve(self, version: str, role: str, ok: int, failed: int = 0) -> None:
        """Count requests as the request path does: (model, version, role, status code)."""
        self.traffic.requests[("fraud", version, role, "200")] += ok
        self.traffic.requests[("fraud", version, role, "500")] += failed

    async def rollout(self) -> Rollout:
        return Rollout.from_json((await self.store.rollout_states())["fraud"][1])

    def doc(self) -> Any:
        route = self.table.get("fraud")
        assert route is not None
        return route.doc


def make_parts(
    registry: Registry, store: StateStore, shadows: ShadowRunner, quality: Quality | None = None
) -> Parts:
    table = RouteTable(store)
    traffic = Traffic()
    guards = GuardEvaluator(table, registry, shadows, traffic, GuardMetrics(), quality=quality)
    return Parts(registry, table, traffic, shadows, Events(), guards)


@pytest.fixture
async def parts(registry: Registry) -> AsyncIterator[Parts]:
    shadows = ShadowRunner(registry, 8)
    try:
        yield make_parts(registry, MemoryStore(), shadows)
    finally:
        await shadows.close()


async def pin(parts: Parts, version: str = "1") -> int:
    record = await parts.table.write(
        "fraud", SingleDoc(version=version), expected=None, who="alice", action="put",
        reason="serve 1", artifacts=parts.registry.artifacts("fraud", [version]),
    )  # fmt: skip
    assert record is not None
    return record.revision


async def template(parts: Parts, **fields: Any) -> int:
    doc = {"shadow_s": 0, "steps": [0.25, 0.5], "step_s": 5, **fields}
    return await parts.store.put_rollout(
        "fraud", doc, expected=None, who="alice", action="rollout_put", reason="test"
    )


async def test_shadow_then_steps_then_promotion_with_auto_approval(parts: Parts) -> None:
    await pin(parts)
    revision = await template(parts, shadow_s=10)
    engine = parts.engine()
    await engine.tick(100.0)
    assert parts.doc() == SingleDoc(version="1", shadow=ShadowSpec(("2",)))
    entry = (await parts.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action) == (f"rollout:{revision}", "rollout_start")
    assert entry.reason == "version 2 ready: shadow for 10 s"
    await engine.tick(109.9)  # shadow_s not over
    assert (await parts.rollout()).phase == "shadow"
    await engine.tick(110.0)
    assert parts.doc() == parse_policy(
        {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.25,
         "steps": [0.25, 0.5]}
    )  # fmt: skip
    await engine.tick(114.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.25
    await engine.tick(115.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.5
    entry = (await parts.store.audit("fraud", 1))[0]
    assert entry.action == "advance"
    assert entry.reason == "canary step 2 of 2 (weight 0.5) after 5 s"
    await engine.tick(120.0)
    assert parts.doc() == SingleDoc(version="2")
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.ended_at, rollout.weight) == ("promoted", 120.0, 1.0)
    assert parts.events.kinds() == [
        "rollout.started", "rollout.advanced", "rollout.advanced", "rollout.promoted",
    ]  # fmt: skip
    assert parts.events.seen[1] == (
        "rollout.advanced", "fraud",
        {"version": "2", "step": 0, "weight": 0.25, "why": rollout_why(parts, 1)},
    )  # fmt: skip
    await engine.tick(500.0)  # version 2 serves now: nothing newer, nothing starts
    assert len(parts.events.seen) == 4


def rollout_why(parts: Parts, index: int) -> str:
    return str(parts.events.seen[index][2]["why"])


async def test_a_model_without_a_policy_is_pinned_to_what_it_serves(parts: Parts) -> None:
    revision = await template(parts)
    engine = parts.engine()
    await engine.tick(100.0)
    assert parts.doc() == SingleDoc(version="2")  # the default route's version, now pinned
    entry = (await parts.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action) == (f"rollout:{revision}", "pin")
    await engine.tick(200.0)
    assert "fraud" not in await parts.store.rollout_states()  # nothing newer than 2


async def test_a_rolled_out_version_does_not_start_again(parts: Parts) -> None:
    await pin(parts)
    await template(parts)
    engine = parts.engine()
    await engine.tick(100.0)
    await manual_rollback(parts)
    await engine.tick(101.0)
    rollout = await parts.rollout()
    assert rollout.phase == "aborted"
    assert rollout.why == "policy changed by bob (rollback: v2 looks wrong)"
    await engine.tick(300.0)  # 2 is READY and newer than 1, but was tried
    assert parts.doc() == SingleDoc(version="1")
    assert parts.events.kinds() == ["rollout.started", "rollout.aborted"]


async def manual_rollback(parts: Parts) -> None:
    route = parts.table.get("fraud")
    assert route is not None
    await parts.table.write(
        "fraud", route.doc.apply("rollback"), expected=route.revision, who="bob",
        action="rollback", reason="v2 looks wrong", artifacts={},
    )  # fmt: skip


async def test_required_approval_holds_the_promotion_until_approved(parts: Parts) -> None:
    await pin(parts)
    await template(parts, approval="required", steps=[0.5])
    engine = parts.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.gate, rollout.why) == (
        "awaiting_approval", "promotion", "awaiting approval before promotion",
    )  # fmt: skip
    assert parts.events.seen[-1] == (
        "approval.requested", "fraud",
        {"version": "2", "who": rollout_who(rollout), "reason": rollout.why},
    )  # fmt: skip
    await engine.tick(1000.0)  # held however long it waits
    assert isinstance(parts.doc(), CanaryDoc)
    await engine.decide("fraud", "approved", "carol", "metrics look fine")
    entry = (await parts.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action, entry.reason) == ("carol", "approve", "metrics look fine")
    assert parts.events.seen[-1] == (
        "approval.granted", "fraud", {"version": "2", "who": "carol", "reason": "metrics look fine"}
    )  # fmt: skip
    with pytest.raises(Conflict):  # one decision per gate
        await engine.decide("fraud", "rejected", "dave", "no")
    await engine.tick(1001.0)
    assert parts.doc() == SingleDoc(version="2")
    entry = (await parts.store.audit("fraud", 1))[0]
    assert (entry.action, entry.reason) == (
        "promote", "promoted after canary step 1 of 1 (weight 0.5) (approved by carol)",
    )  # fmt: skip
    assert (await parts.rollout()).phase == "promoted"
    with pytest.raises(Conflict):  # nothing awaits approval any more
        await engine.decide("fraud", "approved", "carol", "again")


def rollout_who(rollout: Rollout) -> str:
    return f"rollout:{rollout.template_revision}"


async def test_approve_each_step_holds_every_traffic_increase(parts: Parts) -> None:
    await pin(parts)
    await template(parts, approval="required", approve_each_step=True, shadow_s=5)
    engine = parts.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)  # shadow over: the first step waits
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.gate) == ("awaiting_approval", "step")
    assert rollout.why == "awaiting approval before canary step 1 of 2 (weight 0.25)"
    await engine.decide("fraud", "approved", "carol", "go")
    await engine.tick(106.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.25
    await engine.tick(111.0)
    assert (await parts.rollout()).gate == "step"
    await engine.decide("fraud", "approved", "carol", "go on")
    await engine.tick(112.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.5
    await engine.tick(117.0)
    assert (await parts.rollout()).gate == "promotion"
    assert parts.events.kinds().count("approval.requested") == 3


async def test_reject_rolls_back_with_the_reason_in_the_audit(parts: Parts) -> None:
    await pin(parts)
    await template(parts, approval="required", steps=[0.5])
    engine = parts.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)
    await engine.decide("fraud", "rejected", "carol", "fraud team saw false positives")
    entry = (await parts.store.audit("fraud", 1))[0]
    assert (entry.who, entry.action, entry.reason) == (
        "carol", "reject", "fraud team saw false positives",
    )  # fmt: skip
    await engine.tick(106.0)
    assert parts.doc() == SingleDoc(version="1")
    entry = (await parts.store.audit("fraud", 1))[0]
    assert entry.action == "rollback"
    assert entry.reason == "rejected by carol: fraud team saw false positives"
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.why) == ("rolled_back", entry.reason)
    assert parts.events.kinds()[-2:] == ["approval.rejected", "rollout.rolled_back"]


async def test_a_step_waits_for_the_guards_to_pass(parts: Parts) -> None:
    await pin(parts)
    await template(parts, guards=GUARDS)
    engine = parts.engine()
    await engine.tick(100.0)
    await parts.guards.tick(100.0)
    await engine.tick(106.0)  # step_s is over but the guards have no verdict yet
    await parts.guards.tick(101.0)
    assert parts.guards.verdict("fraud") == "insufficient"
    await engine.tick(107.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.25
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 100)
    await parts.guards.tick(102.0)
    assert parts.guards.verdict("fraud") == "pass"
    await engine.tick(108.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.5
    assert parts.doc().guards is not None and parts.doc().guards.max_error_ratio == 0.05


async def test_a_breaching_guard_rolls_back_and_ends_the_rollout(parts: Parts) -> None:
    await pin(parts)
    await template(parts, guards=GUARDS)
    engine = parts.engine()
    await engine.tick(100.0)
    await parts.guards.tick(100.0)
    parts.serve("1", "baseline", 300)
    parts.serve("2", "candidate", 80, failed=20)
    await parts.guards.tick(101.0)
    assert parts.doc() == SingleDoc(version="1", guards=parts.doc().guards)
    await engine.tick(101.5)
    rollout = await parts.rollout()
    assert rollout.phase == "rolled_back"
    assert rollout.why.startswith("guard:max_error_ratio rollback: ")
    assert parts.events.kinds() == ["rollout.started", "rollout.rolled_back"]
    await engine.tick(500.0)  # nothing more written for it
    assert (await parts.store.audit("fraud", 1))[0].who == "guard:max_error_ratio"


async def test_a_baseline_under_its_quality_floor_does_not_hold_the_shadow(
    registry: Registry,
) -> None:
    """The version a retrained candidate is to replace is often under its quality floor: that
    is why there is a candidate. The shadow's policy leaves the quality conditions out (they
    would judge the serving version, and no guard can act on a single), so the shadow ends on
    time; the canary judges the candidate's quality. (It held for good before.)"""
    shadows = ShadowRunner(registry, 8)
    quality = Quality(registry, MemoryPredictions(3600.0, 1000, 1 << 20), window_s=3600)
    parts = make_parts(registry, MemoryStore(), shadows, quality)
    try:
        await pin(parts)
        info = registry.get("fraud", "1").info
        labels = []
        for i in range(30):  # version 1 is wrong on every label: far under the floor
            score = 0.9 if i % 2 else 0.1
            quality.served(info, {"probability": np.array([[score]], np.float32)}, f"b-{i}")
            labels.append({"id": f"b-{i}", "label": int(score < 0.5)})
        answer, _ = await quality.take("fraud", {"outcomes": labels})
        assert answer["accepted"] == 30
        floor = {"min_labels": 20, "min_quality": {"accuracy": 0.6}}
        await template(parts, shadow_s=10, guards={**GUARDS, "min_requests": 10, **floor})
        engine = parts.engine()
        await engine.tick(100.0)
        shadow = parts.doc()
        assert isinstance(shadow, SingleDoc) and shadow.shadow_versions() == ("2",)
        await parts.guards.tick(100.0)
        parts.serve("1", "primary", 50)
        await parts.guards.tick(101.0)
        assert parts.guards.verdict("fraud") == "pass"
        await engine.tick(110.0)
        canary = parts.doc()
        assert isinstance(canary, CanaryDoc) and canary.candidate == "2"
        assert canary.guards is not None and canary.guards.min_quality == (("accuracy", 0.6),)
        # the shadow kept the template's other conditions
        assert shadow.guards is not None and shadow.guards.max_error_ratio == 0.05
        assert not shadow.guards.judges_quality
    finally:
        await shadows.close()


async def test_a_version_starts_once_every_replica_serves_it(parts: Parts) -> None:
    """The repository API is per replica: a canary written when only the leader had loaded the
    candidate sent the other replicas requests for a version they did not have (404)."""
    exchange = CountsExchange(parts.store, parts.registry, parts.traffic, shared=True, workers=1)
    engine = RolloutEngine(parts.table, parts.registry, parts.guards, fleet=exchange)
    await pin(parts)
    await template(parts)
    sha = {v: parts.registry.get("fraud", v).info.sha256 for v in ("1", "2")}

    async def other_replica(member: str, serves: dict[str, str] | None) -> None:
        """What another replica publishes: version -> sha256 it serves (None: says nothing)."""
        blobs = {"traffic": b'{"requests": [], "inflight": {}}'}
        if serves is not None:
            blobs["ready"] = orjson.dumps([["fraud", v, h] for v, h in serves.items()])
        await parts.store.publish_counts(member, blobs, ttl_s=60)

    await other_replica("b:1:1", {"1": sha["1"]})  # has not loaded version 2 yet
    await other_replica("c:1:1", None)  # an older gateway, which says nothing: not waited for
    await parts.store.publish_counts(  # a replica of a fleet sharded by model: not waited for
        "d:1:1", {"ready": orjson.dumps([["risk", "1", "ab"]])}, ttl_s=60
    )
    await engine.tick(100.0)
    assert parts.doc() == SingleDoc(version="1")
    assert "fraud" not in await parts.store.rollout_states()
    await other_replica("b:1:1", {"1": sha["1"], "2": "0" * 64})  # another artifact as 2
    await engine.tick(100.5)
    assert parts.doc() == SingleDoc(version="1")
    await other_replica("b:1:1", sha)
    await engine.tick(101.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().candidate == "2"
    assert (await parts.rollout()).started_at == 101.0


class Webhook:
    """A real HTTP server answering ``status`` to every POST and keeping the bodies."""

    def __init__(self) -> None:
        self.status = 503
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.bodies.append(orjson.loads(self.rfile.read(length)))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/confirm"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


async def test_the_confirm_webhook_holds_until_it_answers_2xx(
    parts: Parts, webhook: Webhook
) -> None:
    await pin(parts)
    await template(parts, steps=[0.5], confirm_url=webhook.url)
    engine = parts.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)
    await engine.tick(106.0)
    rollout = await parts.rollout()
    assert rollout.phase == "confirming" and isinstance(parts.doc(), CanaryDoc)
    assert len(webhook.bodies) == 2  # asked once a tick
    assert webhook.bodies[0]["type"] == "confirm-promotion"
    assert webhook.bodies[0]["rollout"]["version"] == "2"
    assert engine.confirm_failures["fraud"] == 2
    webhook.status = 204
    await engine.tick(107.0)
    assert parts.doc() == SingleDoc(version="2")
    assert (await parts.rollout()).why.endswith("; confirmed by the webhook")


async def test_an_unreachable_webhook_holds_too(parts: Parts, webhook: Webhook) -> None:
    await pin(parts)
    webhook.close()  # nothing listens on its port any more
    await template(parts, steps=[0.5], confirm_url=webhook.url)
    engine = parts.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)
    assert (await parts.rollout()).phase == "confirming"
    assert engine.confirm_failures["fraud"] == 1
    await engine.stop()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = await fresh_prefix(REDIS_URL)
    yield prefix
    await flush_prefix(REDIS_URL, prefix)


@pytest.fixture
async def redis_parts(registry: Registry, redis_prefix: str) -> AsyncIterator[tuple[Parts, Parts]]:
    """Two replicas on one Redis prefix: each its own store handle, table and engine."""
    shadows = ShadowRunner(registry, 8)
    stores = [RedisStore(REDIS_URL, redis_prefix), RedisStore(REDIS_URL, redis_prefix)]
    try:
        yield make_parts(registry, stores[0], shadows), make_parts(registry, stores[1], shadows)
    finally:
        for store in stores:
            await store.close()
        await shadows.close()


async def test_on_redis_only_the_leader_drives_and_another_takes_over(
    redis_parts: tuple[Parts, Parts],
) -> None:
    first, second = redis_parts
    await pin(first)
    await template(first)
    ttl_s = 0.3
    leader, follower = first.engine(lease_ttl_s=ttl_s), second.engine(lease_ttl_s=ttl_s)
    await leader.tick(100.0)
    await follower.tick(100.0)
    assert leader.leader and not follower.leader
    assert follower.rollouts["fraud"][1].phase == "canary"  # every replica reads the state
    await follower.tick(105.0)  # step_s over, but the follower writes nothing
    await second.table.refresh()
    assert isinstance(second.doc(), CanaryDoc) and second.doc().weight == 0.25
    # the leader stops; its lease lapses within its TTL and the other replica takes over
    deadline = time.monotonic() + 10 * ttl_s
    while not follower.leader:
        assert time.monotonic() < deadline, "the lease never lapsed"
        await asyncio.sleep(ttl_s / 10)
        await follower.tick(105.0)
    await second.table.refresh()
    assert isinstance(second.doc(), CanaryDoc) and second.doc().weight == 0.5
    await follower.tick(110.0)
    await first.table.refresh()
    assert first.doc() == SingleDoc(version="2")
    assert first.events.kinds() == ["rollout.started"]
    assert second.events.kinds() == ["rollout.advanced", "rollout.promoted"]


async def test_a_redis_emptied_under_a_rollout_gets_it_back_and_it_goes_on(
    redis_parts: tuple[Parts, Parts], redis_prefix: str
) -> None:
    """Redis restarted empty while a rollout awaits approval: the engines keep their copies and
    act on nothing; the first replica to notice puts the template and the rollout's state back
    with the policies (RouteTable.refresh); the approval then goes through."""
    first, second = redis_parts
    await pin(first)
    await template(first, approval="required", steps=[0.5])
    engine, other = first.engine(), second.engine()
    await engine.tick(100.0)
    await engine.tick(105.0)
    await other.tick(105.0)  # every replica reads the templates and states
    await second.table.refresh()
    assert (await first.rollout()).phase == "awaiting_approval"
    before = (await first.store.rollouts(), await first.store.rollout_states())
    assert await flush_prefix(REDIS_URL, redis_prefix) > 0
    for replica in (engine, other):
        await replica.tick(106.0)
        assert not replica.leader and replica.rollouts["fraud"][1].phase == "awaiting_approval"
    assert await first.store.rollouts() == {} and await first.store.rollout_states() == {}
    await second.table.refresh()  # notices, and restores from its replica's copy
    assert second.table.store_resets == 1
    assert (await first.store.rollouts(), await first.store.rollout_states()) == before
    await first.table.refresh()
    assert first.table.store_resets == 0  # restored already: its table found nothing missing
    await engine.decide("fraud", "approved", "carol", "after the reset")
    await engine.tick(107.0)
    await first.table.refresh()
    assert first.doc() == SingleDoc(version="2")
    assert (await first.rollout()).phase == "promoted"


async def test_its_own_write_whose_state_was_lost_is_taken_up(parts: Parts) -> None:
    """The store failed between a policy write and the state's save: the next tick reads the
    rollout's own change in the audit and carries on from the policy written."""
    await pin(parts)
    revision = await template(parts)
    engine = parts.engine()
    await engine.tick(100.0)
    route = parts.table.get("fraud")
    assert route is not None and isinstance(route.doc, CanaryDoc)
    await parts.table.write(  # the step to 0.5 as the engine writes it, its state never saved
        "fraud", route.doc.apply("advance"), expected=route.revision, who=f"rollout:{revision}",
        action="advance", reason="canary step 2 of 2 (weight 0.5) after 5 s", artifacts={},
    )  # fmt: skip
    await engine.tick(101.0)
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.step, rollout.since) == ("canary", 1, 101.0)
    await engine.tick(106.0)
    assert parts.doc() == SingleDoc(version="2")
    assert parts.events.kinds() == ["rollout.started", "rollout.promoted"]


async def test_its_own_start_whose_state_was_lost_is_taken_up(parts: Parts) -> None:
    await pin(parts)
    revision = await template(parts)
    route = parts.table.get("fraud")
    assert route is not None
    start = parse_policy({"strategy": "canary", "baseline": "1", "candidate": "2",
                          "steps": [0.25, 0.5]})  # fmt: skip
    await parts.table.write(
        "fraud", start, expected=route.revision, who=f"rollout:{revision}",
        action="rollout_start", reason="version 2 ready: canary step 1 of 2 (weight 0.25)",
        artifacts={},
    )  # fmt: skip
    engine = parts.engine()
    await engine.tick(100.0)
    rollout = await parts.rollout()
    assert (rollout.phase, rollout.step, rollout.version, rollout.baseline) == (
        "canary", 0, "2", "1",
    )  # fmt: skip
    await engine.tick(105.0)
    assert isinstance(parts.doc(), CanaryDoc) and parts.doc().weight == 0.5


async def test_a_persons_canary_is_not_taken_for_a_rollout(parts: Parts) -> None:
    await pin(parts)
    await template(parts)
    route = parts.table.get("fraud")
    assert route is not None
    canary = parse_policy({"strategy": "canary", "baseline": "1", "candidate": "2"})
    await parts.table.write(
        "fraud", canary, expected=route.revision, who="bob", action="put", reason="mine",
        artifacts={},
    )  # fmt: skip
    await parts.engine().tick(100.0)
    assert "fraud" not in await parts.store.rollout_states()
    assert parts.doc() == canary


@pytest.fixture
async def three_versions(fraud_repo: Path, tmp_path: Path) -> AsyncIterator[tuple[Registry, Path]]:
    """fraud 1 and 2 loaded, in a repository of the test's own where a version 3 can arrive."""
    root = tmp_path / "models"
    shutil.copytree(fraud_repo / "fraud", root / "fraud")
    settings = Settings(model_repository=root, cache_dir=reference_cache())
    executor = ThreadPoolExecutor(2)
    registry = Registry(root, version_loader(settings, executor, lambda: False))
    await registry.load_all()
    try:
        yield registry, root
    finally:
        await registry.close()
        executor.shutdown()


async def test_a_newer_version_during_a_rollout_waits_for_it_to_end(
    three_versions: tuple[Registry, Path],
) -> None:
    registry, root = three_versions
    shadows = ShadowRunner(registry, 8)
    parts = make_parts(registry, MemoryStore(), shadows)
    try:
        await pin(parts)
        await template(parts)
        engine = parts.engine()
        await engine.tick(100.0)
        shutil.copytree(root / "fraud" / "2", root / "fraud" / "3")
        await registry.load("fraud")
        assert registry.ready_versions("fraud") == ["1", "2", "3"]
        await engine.tick(105.0)  # the rollout of 2 goes on: 3 is queued, not superseding
        assert parts.doc() == parse_policy(
            {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.5,
             "steps": [0.25, 0.5]}
        )  # fmt: skip
        await engine.tick(110.0)
        assert parts.doc() == SingleDoc(version="2")
        await engine.tick(111.0)  # 2 serves: 3 starts against it
        rollout = await parts.rollout()
        assert (rollout.version, rollout.baseline, rollout.phase) == ("3", "2", "canary")
        assert rollout.tried[-2:] == (
            f"2@{registry.get('fraud', '2').info.sha256}",
            f"3@{registry.get('fraud', '3').info.sha256}",
        )
    finally:
        await shadows.close()


async def test_a_candidate_unloaded_during_its_rollout_is_rolled_back(parts: Parts) -> None:
    await pin(parts)
    await template(parts)
    engine = parts.engine()
    await engine.tick(100.0)
    await parts.registry.unload("fraud", ["2"])
    await engine.tick(105.0)  # the next step cannot name an unloaded version
    rollout = await parts.rollout()
    assert rollout.phase == "rolled_back"
    assert rollout.why.startswith("cannot continue: candidate: version '2' is not loaded")
    assert parts.doc() == SingleDoc(version="1")
    assert parts.events.kinds() == ["rollout.started", "rollout.rolled_back"]


async def test_with_its_baseline_gone_too_the_rollout_is_aborted(parts: Parts) -> None:
    await pin(parts)
    await template(parts)
    engine = parts.engine()
    await engine.tick(100.0)
    await parts.registry.unload("fraud")
    await engine.tick(105.0)
    assert (await parts.rollout()).phase == "aborted"
    assert isinstance(parts.doc(), CanaryDoc)  # left as it is: nothing valid to write
    await engine.tick(110.0)  # the canary left in place is not taken up as a new start
    assert parts.events.kinds() == ["rollout.started", "rollout.aborted"]
