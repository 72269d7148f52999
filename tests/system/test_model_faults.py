"""Model faults under concurrent load: broken files at load, a model that raises inside one
request, a model slower than the callers' deadlines. Each test counts every request it sends."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.load import (
    Load,
    Shot,
    figures,
    fraud_bodies,
    fraud_body,
    metric_sum,
    samples,
)
from tests.support.models import write_failing_fraud, write_slow_fraud
from tests.support.server import ADMIN, GatewayServer, Server

POISON = 100.0  # feature 0 above this makes version 3 fail; the demo's inputs stay far below
POISONED = fraud_body([1000.0] + [0.0] * 31)
CLEAN = fraud_bodies(64, seed=31)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("faults") / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    write_failing_fraud(root / "fraud" / "3", 0, POISON)
    # about 30 ms a run at one row (0.3 ms a layer): far beyond the 5 ms deadlines sent to it
    write_slow_fraud(root / "fraud" / "4", layers=100)
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[Server]:
    # Every request goes through the batcher (none inline) and waits up to 2 ms for company,
    # so concurrent requests to one version merge into shared runs.
    args = ["--inline-threshold-us", "0", "--max-queue-delay-us", "2000"]
    with Server(repo, args=args) as s:
        r = httpx.put(
            s.url + "/admin/routes/fraud",
            headers=ADMIN,
            json={"policy": {"strategy": "single", "version": "1"}, "reason": "faults"},
        )
        assert r.status_code == 200, r.text
        yield s


def pinned(server: GatewayServer, version: str) -> str:
    return f"{server.url}/v2/models/fraud/versions/{version}/infer"


def requests_counted(server: GatewayServer, version: str) -> Counter[str]:
    """The gateway's own count of answered requests of a fraud version, by status code."""
    counts: Counter[str] = Counter()
    for labels, value in samples(server.url, "turnout_requests_total"):
        if labels["model"] == "fraud" and labels["version"] == version:
            counts[labels["code"]] += int(value)
    return counts


async def run_load(load: Load, seconds: float) -> Load:
    runner = asyncio.create_task(load.run())
    await asyncio.sleep(seconds)
    load.stop.set()
    await runner
    return load


def index(server: GatewayServer) -> dict[str, dict[str, str]]:
    entries = httpx.post(server.url + "/v2/repository/index", headers=ADMIN).json()
    return {e["version"]: e for e in entries if e["name"] == "fraud"}


def test_broken_files_at_load_fail_their_version_while_the_others_serve(
    gateway: Server, repo: Path
) -> None:
    fraud = repo / "fraud"
    model = (fraud / "1" / "model.onnx").read_bytes()
    missing, truncated, good = fraud / "5", fraud / "6", fraud / "7"
    missing.mkdir()
    (missing / "metadata.json").write_text("{}")  # a version folder without its model.onnx
    truncated.mkdir()
    (truncated / "model.onnx").write_bytes(model[: len(model) // 2])
    shutil.copytree(fraud / "1", good)
    shots = [Shot(gateway.url + "/v2/models/fraud/infer", b, "routed") for b in CLEAN[:8]]
    shots += [Shot(pinned(gateway, "2"), b, "pinned") for b in CLEAN[8:16]]

    async def scenario() -> tuple[Load, httpx.Response, httpx.Response]:
        load = Load(shots, concurrency=8)
        runner = asyncio.create_task(load.run())
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.sleep(0.5)
            first = await client.post(
                gateway.url + "/v2/repository/models/fraud/load",
                headers=ADMIN,
                json={"parameters": {"versions": ["5", "6", "7"]}},
            )
            # a loaded version whose file is damaged on disk, then reloaded: it keeps serving
            (fraud / "2" / "model.onnx").write_bytes(model[:100])
            second = await client.post(
                gateway.url + "/v2/repository/models/fraud/load",
                headers=ADMIN,
                json={"parameters": {"versions": ["2"]}},
            )
            await asyncio.sleep(0.5)
        load.stop.set()
        await runner
        return load, first, second

    load, first, second = asyncio.run(scenario())
    figures("broken files", sent=load.sent, statuses=dict(load.histogram()), broken=3)
    assert load.sent == len(load.outcomes)
    assert load.histogram() == Counter({200: load.sent})
    assert {o.version for o in load.outcomes} == {"1", "2"}
    assert first.status_code == 400
    message = first.json()["error"]
    assert "version 5: cannot read model.onnx" in message
    assert "version 6: onnxruntime could not load the model" in message
    assert "version 7" not in message
    assert second.status_code == 400 and "version 2" in second.json()["error"]

    states = index(gateway)
    assert {v: e["state"] for v, e in states.items()} == {
        "1": "READY", "2": "READY", "3": "READY", "4": "READY",
        "5": "FAILED", "6": "FAILED", "7": "READY",
    }  # fmt: skip
    assert states["2"]["reason"].startswith("reload failed: onnxruntime could not load")
    for version in ("5", "6"):
        r = httpx.post(pinned(gateway, version), content=CLEAN[0])
        assert r.status_code == 503 and "failed" in r.json()["error"]
    for version in ("2", "7"):
        assert httpx.post(pinned(gateway, version), content=CLEAN[0]).status_code == 200


def test_an_onnxruntime_error_fails_only_the_request_that_caused_it(gateway: Server) -> None:
    before = requests_counted(gateway, "3")
    rows_before = metric_sum(gateway.url, "turnout_batch_rows_total", version="3")
    shots = [
        Shot(pinned(gateway, "3"), POISONED, "poisoned")
        if i % 8 == 3
        else Shot(pinned(gateway, "3"), body, "clean")
        for i, body in enumerate(CLEAN[:48])
    ]
    shots += [Shot(pinned(gateway, "1"), body, "other") for body in CLEAN[48:]]
    load = asyncio.run(run_load(Load(shots, concurrency=16), 3.0))
    figures("onnxruntime error", by_label=dict(load.by_label()))

    assert load.sent == len(load.outcomes)
    sent = load.sent_by_label()
    assert sent["poisoned"] >= 5 and sent["clean"] >= 40
    assert load.by_label() == Counter(
        {
            ("poisoned", 500): sent["poisoned"],
            ("clean", 200): sent["clean"],
            ("other", 200): sent["other"],
        }
    )
    errors = {o.error for o in load.outcomes if o.status == 500}
    assert len(errors) == 1
    error = errors.pop()
    assert error is not None and error.startswith("model execution failed: [ONNXRuntimeError]")
    assert "Gather" in error
    after = requests_counted(gateway, "3")
    assert after - before == Counter({"200": sent["clean"], "500": sent["poisoned"]})
    # Runs of version 3 covered more rows than it was sent: only a merged run that failed and
    # was rerun request by request does that, so poisoned requests did share batches.
    rows = metric_sum(gateway.url, "turnout_batch_rows_total", version="3") - rows_before
    assert rows > sent["clean"] + sent["poisoned"]


def test_a_slow_model_answers_504_past_deadlines_then_drains_and_serves(gateway: Server) -> None:
    hurried = fraud_bodies(16, seed=32, timeout=5_000)  # µs
    before = metric_sum(gateway.url, "turnout_deadline_exceeded_total", version="4")
    shots = [Shot(pinned(gateway, "4"), body, "hurried") for body in hurried]
    shots += [Shot(pinned(gateway, "1"), body, "other") for body in CLEAN[:16]]

    async def scenario() -> tuple[Load, float, httpx.Response, httpx.Response]:
        load = await run_load(Load(shots, concurrency=16), 3.0)
        stopped = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as client:
            while metric_sum(gateway.url, "turnout_queue_depth", version="4") > 0:
                assert time.monotonic() - stopped < 5, "the queue did not drain"
                await asyncio.sleep(0.05)
            drained = time.monotonic() - stopped
            patient = await client.post(pinned(gateway, "4"), content=CLEAN[0])
            generous = await client.post(
                pinned(gateway, "4"), content=fraud_body(list(range(32)), timeout=30_000_000)
            )
        return load, drained, patient, generous

    load, drained, patient, generous = asyncio.run(scenario())
    figures("slow model", by_label=dict(load.by_label()), drained_s=round(drained, 2))
    assert load.sent == len(load.outcomes)
    sent = load.sent_by_label()
    assert sent["hurried"] >= 50
    assert load.by_label() == Counter(
        {("hurried", 504): sent["hurried"], ("other", 200): sent["other"]}
    )
    assert all("deadline" in (o.error or "") for o in load.outcomes if o.status == 504)
    exceeded = metric_sum(gateway.url, "turnout_deadline_exceeded_total", version="4") - before
    assert exceeded == sent["hurried"]
    assert drained < 5
    assert patient.status_code == 200 and generous.status_code == 200
