"""Graceful shutdown: SIGTERM under load stops accepting, completes every request in flight,
flushes the routing counts to the shared store and exits 0. A second replica on the same Redis
reads the counts back through the API, as it would after a rolling restart."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.load import Load, Shot, figures, fraud_bodies, until_async
from tests.support.models import write_slow_fraud
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, Server

# Version 3 takes about 30 ms a run, so requests are in flight whenever the signal lands.
POLICY = {"strategy": "ab", "arms": {"1": 0.2, "3": 0.8}, "seed": 3}
IN_FLIGHT_AT_SIGNAL = 8


async def ready(load: Load) -> bool:
    return load.unanswered >= IN_FLIGHT_AT_SIGNAL


def test_sigterm_under_load_drains_flushes_and_exits_0(tmp_path: Path, demo_repo: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud" / "1", root / "fraud" / "1")
    write_slow_fraud(root / "fraud" / "3", layers=100)
    with RedisServer(tmp_path / "redis") as redis:
        args = ["--redis-url", redis.url]
        draining, reader = Server(root, args=args, wait_ready=False), Server(root, args=args)
        draining.start()
        with reader:
            draining.wait_until_ready()
            r = httpx.put(
                draining.url + "/admin/routes/fraud",
                headers=ADMIN,
                json={"policy": POLICY, "reason": "shutdown"},
            )
            assert r.status_code == 200, r.text
            revision = r.json()["revision"]

            async def scenario() -> tuple[Load, float]:
                shots = [
                    Shot(draining.url + "/v2/models/fraud/infer", body)
                    for body in fraud_bodies(32, seed=51)
                ]
                load = Load(shots, concurrency=16)
                runner = asyncio.create_task(load.run())
                # Signal once the gateway holds requests: on a loaded machine a fixed warm-up
                # found as few as one in flight.
                await asyncio.sleep(0.5)
                await until_async(lambda: ready(load), timeout_s=30)
                assert draining.process is not None
                draining.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(1.5)
                load.stop.set()
                await runner
                return load, signalled

            load, signalled = asyncio.run(scenario())
            assert draining.process is not None
            code = draining.process.wait(60)  # a second SIGTERM would cut the teardown short
            draining.stop()
            log = draining.log()
            report = httpx.get(reader.url + "/admin/routes/fraud/report", headers=ADMIN).json()

    figures(
        "shutdown",
        sent=load.sent,
        statuses=dict(load.histogram()),
        before=sum(1 for o in load.outcomes if o.written_at and o.written_at < signalled),
        in_flight=sum(1 for o in load.outcomes if o.sent_at < signalled < o.done_at),
        code=code,
    )
    assert code == 0, log
    assert "timeout graceful shutdown exceeded" not in log
    assert load.sent == len(load.outcomes)
    # Sent before the signal: the whole request was written before it (the client's own clock
    # when it started a request lags behind its writes under load).
    before = [o for o in load.outcomes if o.written_at is not None and o.written_at < signalled]
    in_flight = [o for o in before if o.done_at > signalled]
    assert len(in_flight) >= IN_FLIGHT_AT_SIGNAL // 2, "the signal found too few requests in flight"
    assert Counter(o.status for o in before) == Counter({200: len(before)})
    # Once signalled the gateway answers what it had accepted and refuses connections: a caller
    # sees a 200 or a transport error (nothing was run: safe to retry elsewhere), never an error.
    assert set(load.histogram()) <= {200, 0}
    late = [o for o in load.outcomes if o.sent_at > signalled + 0.5]
    assert late and all(o.status == 0 for o in late)
    # The counts of everything answered reached Redis before the process exited.
    assert report["revision"] == revision
    served = Counter(o.version for o in load.outcomes if o.status == 200)
    assert {row["version"]: row["served"] for row in report["versions"]} == dict(served)
