"""What one request may cost a model: queued work of clients that left is dropped (499), a
request without a deadline gets the default one, a version caps the rows of one request
(``max_rows_per_request`` in its config.json), and the outputs of one request are capped
(``--max-response-bytes``) before they are encoded."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from gateway.cli import serve_settings
from gateway.demo import sample_inputs
from gateway.http.codec import output_bytes
from tests.support.models import write_expanding, write_slow_fraud
from tests.support.server import GatewayServer, InProcessServer, until

DEFAULT_DEADLINE_MS = 400  # far below the slow version's BUSY_ROWS run
BUSY_ROWS = 256  # about 2.5 s for the slow version on one core (70 ms for one row)
RESPONSE_CAP = 1 << 20
ROW_CAP = 4


def fraud_body(rows: int, timeout_us: int | None = None) -> bytes:
    data = sample_inputs("fraud", rows, seed=4)["input"].ravel().tolist()
    doc: dict[str, object] = {
        "inputs": [{"name": "input", "shape": [rows, 32], "datatype": "FP32", "data": data}]
    }
    if timeout_us is not None:
        doc["parameters"] = {"timeout": timeout_us}
    return orjson.dumps(doc)


def expanding_body(size: int) -> bytes:
    """A request of about 75 bytes that asks for ``size`` FP32 elements (4 bytes each)."""
    tensor = {"name": "size", "shape": [1], "datatype": "INT64", "data": [size]}
    return orjson.dumps({"inputs": [tensor]})


def raw_request(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Iterator[InProcessServer]:
    """fraud v1 capped at ROW_CAP rows per request, a slow fraud v5 (seconds to load) that runs
    one request at a time, and a model whose output size is an input value."""
    root = tmp_path_factory.mktemp("bounds") / "models"
    shutil.copytree(demo_repo / "fraud" / "1", root / "fraud" / "1")
    (root / "fraud" / "1" / "config.json").write_text(json.dumps({"max_rows_per_request": ROW_CAP}))
    slow = root / "fraud" / "5"
    write_slow_fraud(slow, layers=50)  # fewer layers than the default: it loads in seconds
    (slow / "config.json").write_text(json.dumps({"enabled": False}))
    write_expanding(root / "expanding" / "1")
    args = [
        "--request-timeout-ms",
        str(DEFAULT_DEADLINE_MS),
        "--max-response-bytes",
        str(RESPONSE_CAP),
    ]
    with InProcessServer(root, args=args) as s:
        yield s


def metric(server: GatewayServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    return int(data.split(b" ", 2)[1])


SLOW = '{model="fraud",version="5"}'
SLOW_PATH = "/v2/models/fraud/versions/5/infer"


def start_busy(gateway: GatewayServer) -> socket.socket:
    """A request that holds the slow version's session for seconds, its deadline long; returns
    once it runs."""
    busy = socket.create_connection(("127.0.0.1", gateway.port))
    busy.sendall(raw_request(SLOW_PATH, fraud_body(BUSY_ROWS, timeout_us=60_000_000)))
    until(lambda: metric(gateway, 'turnout_requests_in_flight{model="fraud"}') == 1)
    return busy


def test_queued_requests_of_clients_that_left_are_dropped_unrun(gateway: GatewayServer) -> None:
    rows, abandoned = (
        metric(gateway, f"turnout_batch_rows_total{SLOW}"),
        metric(gateway, f"turnout_abandoned_total{SLOW}"),
    )
    closed = 'turnout_requests_total{code="499",model="fraud",role="pinned",version="5"}'
    closed_before = metric(gateway, closed)
    busy = start_busy(gateway)
    waiting = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(5)]
    try:
        for sock in waiting:
            sock.sendall(raw_request(SLOW_PATH, fraud_body(1, timeout_us=60_000_000)))
        # The version runs one request at a time: these five wait behind the busy one.
        until(lambda: metric(gateway, f"turnout_queue_depth{SLOW}") == 5)
    finally:
        for sock in waiting:
            sock.close()
    until(lambda: metric(gateway, f"turnout_abandoned_total{SLOW}") == abandoned + 5)
    until(lambda: metric(gateway, closed) == closed_before + 5)
    assert metric(gateway, f"turnout_queue_depth{SLOW}") == 0
    with busy:
        assert read_status(busy) == 200
    # Only the busy request ran: its rows, none of the five that left.
    until(lambda: metric(gateway, f"turnout_batch_rows_total{SLOW}") == rows + BUSY_ROWS)


def test_a_request_without_a_deadline_gets_the_default_one(gateway: GatewayServer) -> None:
    rows = metric(gateway, f"turnout_batch_rows_total{SLOW}")
    busy = start_busy(gateway)
    with busy:
        # No "timeout" parameter: the configured default deadline passes while it waits.
        late = httpx.post(gateway.url + SLOW_PATH, content=fraud_body(1), timeout=60)
        assert late.status_code == 504 and "deadline" in late.json()["error"]
        assert read_status(busy) == 200
    until(lambda: metric(gateway, f"turnout_batch_rows_total{SLOW}") == rows + BUSY_ROWS)


def test_the_default_deadline_is_30_seconds(tmp_path: Path) -> None:
    settings = serve_settings(["--model-repository", str(tmp_path)], {})
    assert settings.request_timeout_ms == 30_000


def test_a_version_caps_the_rows_of_one_request(gateway: GatewayServer) -> None:
    url = gateway.url + "/v2/models/fraud/versions/1/infer"
    assert httpx.post(url, content=fraud_body(ROW_CAP)).status_code == 200
    refused = httpx.post(url, content=fraud_body(ROW_CAP + 1))
    assert refused.status_code == 400
    message = refused.json()["error"]
    assert f"{ROW_CAP + 1} rows" in message and f"limit of {ROW_CAP}" in message
    assert "max_rows_per_request" in message and "fraud v1" in message


def test_the_outputs_of_one_request_are_capped_before_encoding(gateway: GatewayServer) -> None:
    url = gateway.url + "/v2/models/expanding/infer"
    at_cap = httpx.post(url, content=expanding_body(RESPONSE_CAP // 4))
    assert at_cap.status_code == 200
    assert len(at_cap.json()["outputs"][0]["data"]) == RESPONSE_CAP // 4
    over = httpx.post(url, content=expanding_body(RESPONSE_CAP // 4 + 1))
    assert over.status_code == 413
    message = over.json()["error"]
    assert "'expanding'" in message and f"limit of {RESPONSE_CAP}" in message
    assert "--max-response-bytes" in message
    # 64 MiB of outputs from a 75-byte request: refused, and the refusal is small.
    body = expanding_body(1 << 24)
    assert len(body) < 80
    huge = httpx.post(url, content=body, timeout=60)
    assert huge.status_code == 413 and len(huge.content) < 300
    # A client's choice, not the version's fault: counted as 413, which guards never judge.
    refused = 'turnout_requests_total{code="413",model="expanding",role="default",version="1"}'
    assert metric(gateway, refused) == 2


def test_output_bytes_counts_elements_and_string_bytes() -> None:
    numbers: dict[str, np.ndarray] = {"a": np.zeros((3, 5), np.float32), "b": np.zeros(2, np.int64)}
    assert output_bytes(numbers, 1 << 20) == 3 * 5 * 4 + 2 * 8
    # A string: its UTF-8 bytes and the 4 of its length prefix; bytes as they are.
    strings = {"s": np.array(["ab", "é", b"xyz"], dtype=object)}
    assert output_bytes(strings, 1 << 20) == (4 + 2) + (4 + 2) + (4 + 3)
    # Strings are counted only until the limit is passed: a lower bound, found early.
    many = {"s": np.full(1_000_000, "x" * 100, dtype=object)}
    assert output_bytes(many, 1000) > 1000
