"""Hot swap under load: load version 3, canary it from 0 to 100 % through the admin actions,
promote it, unload version 1. Every request succeeds and is served by a version its policy
revision allows."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.support.load import Load, Shot, figures, fraud_bodies
from tests.support.server import ADMIN, Server

CANARY = {"strategy": "canary", "baseline": "1", "candidate": "3", "weight": 0.0, "seed": 5}
STEPS = [0.05, 0.25, 0.5, 1.0]  # the default steps `advance` walks


async def admin(client: httpx.AsyncClient, method: str, path: str, **body: Any) -> dict[str, Any]:
    r = await client.request(method, path, headers=ADMIN, json={**body, "reason": "hot swap"})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_load_canary_promote_and_unload_under_load_fail_no_request(
    tmp_path: Path, demo_repo: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud" / "1", root / "fraud" / "1")
    with Server(root) as gateway:

        async def scenario() -> tuple[Load, dict[int, set[str]]]:
            allowed: dict[int, set[str]] = {}  # policy revision -> versions it may serve
            shots = [
                Shot(gateway.url + "/v2/models/fraud/infer", body)
                for body in fraud_bodies(64, seed=41)
            ]
            load = Load(shots, concurrency=8)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
                single = {"strategy": "single", "version": "1"}
                put = await admin(client, "PUT", "/admin/routes/fraud", policy=single)
                allowed[put["revision"]] = {"1"}
                runner = asyncio.create_task(load.run())
                await asyncio.sleep(0.3)
                shutil.copytree(root / "fraud" / "1", root / "fraud" / "3")
                r = await client.post(
                    "/v2/repository/models/fraud/load",
                    headers=ADMIN,
                    json={"parameters": {"versions": ["3"]}},
                )
                assert r.status_code == 200, r.text
                put = await admin(client, "PUT", "/admin/routes/fraud", policy=CANARY)
                allowed[put["revision"]] = {"1"}  # weight 0: the candidate gets nothing
                await asyncio.sleep(0.3)
                for weight in STEPS:
                    step = await admin(client, "POST", "/admin/routes/fraud/actions/advance")
                    assert step["policy"]["weight"] == weight
                    allowed[step["revision"]] = {"3"} if weight == 1.0 else {"1", "3"}
                    await asyncio.sleep(0.3)
                done = await admin(client, "POST", "/admin/routes/fraud/actions/promote")
                assert done["policy"] == {"strategy": "single", "version": "3", "seed": 5}
                allowed[done["revision"]] = {"3"}
                await asyncio.sleep(0.3)
                r = await client.post(
                    "/v2/repository/models/fraud/unload",
                    headers=ADMIN,
                    json={"parameters": {"versions": ["1"]}},
                )
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.5)
            load.stop.set()
            await runner
            return load, allowed

        load, allowed = asyncio.run(scenario())
        figures("hot swap", sent=load.sent, statuses=dict(load.histogram()), revisions=len(allowed))
        index = httpx.post(gateway.url + "/v2/repository/index", headers=ADMIN).json()

    assert load.sent == len(load.outcomes) >= 200
    assert load.histogram() == Counter({200: load.sent})
    by_revision: dict[int | None, set[str | None]] = {}
    for o in load.outcomes:
        by_revision.setdefault(o.revision, set()).add(o.version)
    assert set(by_revision) <= set(allowed), by_revision
    for revision, versions in by_revision.items():
        assert revision is not None and versions <= allowed[revision], (revision, versions)
    # the rollout was seen end to end: both ends of it served traffic
    assert {"1"} <= by_revision[min(allowed)] and by_revision[max(allowed)] == {"3"}
    assert {(e["version"], e["state"]) for e in index} == {("1", "UNAVAILABLE"), ("3", "READY")}
