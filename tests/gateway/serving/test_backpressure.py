"""Back-pressure and deadlines through a real gateway: 429 with Retry-After, 504 not run."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.support.models import write_slow_fraud
from tests.support.server import GatewayServer, InProcessServer

ROW = sample_inputs("fraud", 1, seed=4)["input"].ravel().tolist()


def body(timeout_us: int | None = None) -> bytes:
    doc: dict[str, object] = {
        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}]
    }
    if timeout_us is not None:
        doc["parameters"] = {"timeout": timeout_us}
    return orjson.dumps(doc)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Iterator[InProcessServer]:
    """fraud v1 and a slow v5 (its cost measure at load takes seconds: only the tests that need
    it start this one)."""
    root = tmp_path_factory.mktemp("pressure") / "models"
    shutil.copytree(demo_repo / "fraud" / "1", root / "fraud" / "1")
    slow = root / "fraud" / "5"
    write_slow_fraud(slow, per_row=False)  # each run holds the session ~0.2-0.5 s, any rows
    # No merging and a queue of 2: the third concurrent request must be refused.
    (slow / "config.json").write_text(json.dumps({"enabled": False, "max_queue": 2}))
    with InProcessServer(root) as s:
        yield s


def test_a_full_queue_answers_429_with_retry_after(gateway: GatewayServer) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/v2/models/fraud/versions/5/infer", content=body())
                    for _ in range(8)
                )
            )

    responses = asyncio.run(burst())
    codes = Counter(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes[200] >= 2, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue" in refused.json()["error"]
    # The queue drains: the version serves again.
    assert (
        httpx.post(
            gateway.url + "/v2/models/fraud/versions/5/infer", content=body(), timeout=60
        ).status_code
        == 200
    )


def test_a_request_past_its_deadline_is_answered_504_and_not_run(gateway: GatewayServer) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            busy = asyncio.create_task(
                client.post("/v2/models/fraud/versions/5/infer", content=body())
            )
            # Until the gateway serves it: its slow run then holds the version's session.
            deadline = asyncio.get_running_loop().time() + 10
            while (
                'turnout_requests_in_flight{model="fraud"} 1.0'
                not in (await client.get("/metrics")).text
            ):
                assert asyncio.get_running_loop().time() < deadline, "never served"
                await asyncio.sleep(0.005)
            late = await client.post(
                "/v2/models/fraud/versions/5/infer", content=body(timeout_us=5_000)
            )
            return await busy, late

    before = metric(gateway, 'turnout_batch_rows_total{model="fraud",version="5"}')
    busy, late = asyncio.run(scenario())
    assert busy.status_code == 200
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    assert metric(gateway, 'turnout_batch_rows_total{model="fraud",version="5"}') == before + 1
    assert metric(gateway, 'turnout_deadline_exceeded_total{model="fraud",version="5"}') >= 1


def test_invalid_timeout_parameter_is_400(server: GatewayServer) -> None:
    r = httpx.post(server.url + "/v2/models/fraud/versions/1/infer", content=body(timeout_us=-1))
    assert r.status_code == 400 and "timeout" in r.json()["error"]


def metric(server: GatewayServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_inline_runs_are_counted_apart_from_thread_runs(gateway: GatewayServer) -> None:
    def inline(version: str) -> float:
        return metric(gateway, f'turnout_inline_runs_total{{model="fraud",version="{version}"}}')

    def batches(version: str) -> float:
        return metric(gateway, f'turnout_batches_total{{model="fraud",version="{version}"}}')

    light, slow = (inline("1"), batches("1")), (inline("5"), batches("5"))
    for version in ("1", "5"):  # v1 runs in microseconds, v5 for tens of milliseconds
        r = httpx.post(f"{gateway.url}/v2/models/fraud/versions/{version}/infer", content=body())
        assert r.status_code == 200
    assert (inline("1"), batches("1")) == (light[0] + 1, light[1] + 1)
    assert (inline("5"), batches("5")) == (slow[0], slow[1] + 1)


def test_light_requests_that_arrive_together_share_runs(server: GatewayServer) -> None:
    # The HTTP protocol counts the requests waiting for the event loop (gateway.serving.backlog):
    # under concurrent load, light requests merge into shared runs instead of one run each.
    def counters() -> tuple[float, float, float]:
        labels = '{model="fraud",version="1"}'
        return (
            metric(server, f"turnout_batches_total{labels}"),
            metric(server, f"turnout_batch_rows_total{labels}"),
            metric(server, f"turnout_inline_runs_total{labels}"),
        )

    request = (
        b"POST /v2/models/fraud/versions/1/infer HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    ) % (len(body()), body())

    def bursts(rounds: int, width: int) -> list[int]:
        """``width`` connections each send a request before any answer is read: the gateway
        sees them arrive together (an HTTP client library in Python sends too slowly)."""
        statuses = []
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(width)]
        try:
            for _ in range(rounds):
                for sock in sockets:
                    sock.sendall(request)
                for sock in sockets:
                    statuses.append(read_response(sock))
        finally:
            for sock in sockets:
                sock.close()
        return statuses

    before = counters()
    assert set(bursts(rounds=20, width=30)) == {200}
    batches, rows, inline = (a - b for a, b in zip(counters(), before, strict=True))
    assert rows == 600  # every request ran once (20 rounds of 30)
    assert batches < rows  # some runs were shared
    assert inline == batches  # all on the event loop: no thread hop for a light model


def read_response(sock: socket.socket) -> int:
    """The status of one HTTP/1.1 response read whole from ``sock`` (its body is skipped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1])
