"""Every limit against a real gateway: refused with a clear 4xx in the protocol's error format,
and the gateway keeps serving afterwards. The gateway runs with small limits so the tests are
quick; the defaults are checked against the settings."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.settings import Settings, SettingsError
from tests.support.server import ADMIN, GatewayServer, InProcessServer

MAX_BODY = 20 << 20  # room for the 16 MB list of inputs below
MAX_ELEMENTS = 4096
MAX_ROWS = 64
MAX_HEADER = 8 * 1024
FEATURES = 32  # the fraud model's input is FP32 [-1, 32]


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    args = [
        "--max-body-bytes", str(MAX_BODY),
        "--max-tensor-elements", str(MAX_ELEMENTS),
        "--max-batch-rows", str(MAX_ROWS),
        "--max-header-bytes", str(MAX_HEADER),
        # past the 16 MB bodies below, which test the other limits (test_request_budget.py
        # tests this one)
        "--max-decoded-bytes", str(1 << 30),
    ]  # fmt: skip
    with InProcessServer(demo_repo, args=args) as s:
        yield s


def fraud_request(rows: int, **extra: Any) -> dict[str, Any]:
    x = np.random.default_rng(rows).standard_normal((rows, FEATURES)).astype(np.float32)
    tensor = {"name": "input", "shape": [rows, FEATURES], "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": x.ravel().tolist()}], **extra}


def refused(r: httpx.Response, status: int, *fragments: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert list(r.json()) == ["error"]
    for fragment in fragments:
        assert fragment in error, error


def still_serving(gateway: GatewayServer) -> None:
    r = httpx.post(gateway.url + "/v2/models/fraud/infer", json=fraud_request(2))
    assert r.status_code == 200, r.text


def test_the_defaults_are_sane() -> None:
    s = Settings(model_repository=Path("/m"))
    assert s.max_body_bytes == 16 * 1024 * 1024
    assert s.max_decoded_bytes == 128 * 1024 * 1024
    assert (s.head_timeout_s, s.body_timeout_s, s.keep_alive_timeout_s) == (10.0, 30.0, 5.0)
    assert s.max_tensor_elements == 1 << 24
    assert s.max_batch_rows == 1 << 16
    assert s.max_header_bytes == 64 * 1024
    # a default-size batch of a wide model fits every other default
    assert s.max_batch_rows * 256 <= s.max_tensor_elements


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TURNOUT_MAX_BATCH_ROWS", "0"),
        ("TURNOUT_MAX_HEADER_BYTES", "100"),
        ("TURNOUT_MAX_TENSOR_ELEMENTS", "0"),
        ("TURNOUT_MAX_BODY_BYTES", "10"),
    ],
)
def test_a_limit_too_small_to_serve_is_refused_at_start(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({"TURNOUT_MODEL_REPOSITORY": "/m", variable: value})


# -- body size ----------------------------------------------------------------------------------


def padded(rows: int, size: int) -> bytes:
    """A valid request padded with JSON whitespace to exactly ``size`` bytes."""
    body = orjson.dumps(fraud_request(rows))
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_a_body_at_the_limit_is_served_one_byte_more_is_413(gateway: GatewayServer) -> None:
    url = gateway.url + "/v2/models/fraud/infer"
    assert httpx.post(url, content=padded(8, MAX_BODY)).status_code == 200
    r = httpx.post(url, content=padded(8, MAX_BODY + 1))
    refused(r, 413, f"{MAX_BODY + 1} bytes", f"limit of {MAX_BODY}")
    still_serving(gateway)


def test_a_chunked_body_is_cut_off_at_the_limit(gateway: GatewayServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 MiB offered, without a Content-Length
            yield b" " * (1 << 20)

    r = httpx.post(gateway.url + "/v2/models/fraud/infer", content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    refused(r, 413, f"limit of {MAX_BODY} bytes")
    still_serving(gateway)


def test_admin_bodies_have_their_own_cap(gateway: GatewayServer) -> None:
    body = b'{"reason": "' + b"x" * (2 << 20) + b'"}'
    r = httpx.put(gateway.url + "/admin/routes/fraud", headers=ADMIN, content=body)
    refused(r, 413, "exceeds the limit")


# -- tensor elements and rows -------------------------------------------------------------------


def test_elements_are_limited_from_the_declared_shape(gateway: GatewayServer) -> None:
    # a trillion elements declared, none sent: refused before anything is allocated
    huge = {"name": "in_fp32", "shape": [1, 10**12], "datatype": "FP32", "data": []}
    r = httpx.post(gateway.url + "/v2/models/echo/infer", json={"inputs": [huge]})
    refused(r, 400, "in_fp32", f"above the limit of {MAX_ELEMENTS}")
    cols = MAX_ELEMENTS + 1
    over = {"name": "in_fp32", "shape": [1, cols], "datatype": "FP32", "data": [0.0] * cols}
    refused(httpx.post(gateway.url + "/v2/models/echo/infer", json={"inputs": [over]}), 400)


def test_rows_per_request_are_limited(gateway: GatewayServer) -> None:
    url = gateway.url + "/v2/models/fraud/infer"
    r = httpx.post(url, json=fraud_request(MAX_ROWS))
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [MAX_ROWS, 1]
    r = httpx.post(url, json=fraud_request(MAX_ROWS + 1))
    refused(r, 400, "'input'", f"{MAX_ROWS + 1} rows", f"limit of {MAX_ROWS}")


def test_rows_are_limited_in_binary_requests_too(gateway: GatewayServer) -> None:
    rows = MAX_ROWS + 1
    raw = np.zeros((rows, FEATURES), dtype="<f4").tobytes()
    params = {"binary_data_size": len(raw)}
    tensor = {"name": "input", "shape": [rows, FEATURES], "datatype": "FP32", "parameters": params}
    head = orjson.dumps({"inputs": [tensor]})
    r = httpx.post(
        gateway.url + "/v2/models/fraud/versions/1/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    refused(r, 400, f"{rows} rows")


# -- JSON nesting -------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "template",
    [
        '{"id": %s, "inputs": []}',
        '{"parameters": {"k": %s}, "inputs": []}',
        '{"inputs": [{"name": "input", "datatype": "FP32", "shape": %s, "data": []}]}',
        '{"inputs": [{"name": "input", "datatype": %s, "shape": [1, 32], "data": []}]}',
        '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": %s}]}',
        '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [%s]}]}',
        '{"inputs": [], "outputs": [{"name": %s}]}',
        '{"inputs": [%s]}',
    ],
    ids=["id", "parameter", "shape", "datatype", "data", "data-leaf", "output", "input"],
)
def test_deep_nesting_anywhere_is_a_bad_request(gateway: GatewayServer, template: str) -> None:
    """orjson parses up to 1024 levels; whatever the gateway does with such a value (including
    quoting it in the error) must stay a 400."""
    for depth in (1000, 1022):
        body = (template % nested(depth)).encode()
        r = httpx.post(gateway.url + "/v2/models/fraud/infer", content=body)
        refused(r, 400)
    still_serving(gateway)


@pytest.mark.parametrize(
    "template",
    [
        '{"policy": {"strategy": %s}, "reason": "x"}',
        '{"policy": {"strategy": "single", "version": %s}, "reason": "x"}',
        '{"policy": {"strategy": "ab", "arms": {"1": %s, "2": 0.5}}, "reason": "x"}',
        '{"policy": {"strategy": "single", "version": "1", "guards": {"window_s": %s}}, '
        '"reason": "x"}',
        '{"policy": {"strategy": "single", "version": "1", "seed": %s}, "reason": "x"}',
        '{"policy": {"strategy": "single", "version": "1"}, "reason": %s}',
    ],
    ids=["strategy", "version", "arm-weight", "guard", "seed", "reason"],
)
def test_deep_nesting_in_admin_bodies_is_a_bad_request(
    gateway: GatewayServer, template: str
) -> None:
    for deep in [nested(1000), '{"k": ' * 1000 + "1" + "}" * 1000]:
        body = (template % deep).encode()
        r = httpx.put(gateway.url + "/admin/routes/fraud", headers=ADMIN, content=body)
        refused(r, 400)


def test_nesting_beyond_the_parser_cap_is_malformed_json(gateway: GatewayServer) -> None:
    body = ('{"inputs": ' + nested(100_000) + "}").encode()
    refused(httpx.post(gateway.url + "/v2/models/fraud/infer", content=body), 400, "depth")


def test_data_nested_deeper_than_the_shape_is_refused(gateway: GatewayServer) -> None:
    rows = [[[0.0] * FEATURES]]  # rank 3 for a rank-2 input
    tensor = {"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": rows}
    r = httpx.post(gateway.url + "/v2/models/fraud/infer", json={"inputs": [tensor]})
    refused(r, 400, "'input'")


# -- number of inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (
            {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32},
            "inputs[1]: input 'input' is given twice",
        ),
        ({"name": "other", "shape": [1], "datatype": "FP32", "data": [0.0]}, "inputs[0]: unknown"),
        (1, "inputs[0] must be"),
    ],
    ids=["duplicates", "unknown", "not-objects"],
)
def test_a_huge_list_of_inputs_is_refused_at_the_first_extra_entry(
    gateway: GatewayServer, entry: Any, fragment: str
) -> None:
    """16 MB of inputs: each entry past the model's inputs is unknown or a duplicate, so
    decoding stops at the first of them, which the message names by its index (parsing the
    JSON is the rest of the cost: about 0.3 s here, loadtests/ measure speed)."""
    count = (16 << 20) // (len(orjson.dumps(entry)) + 1)
    body = orjson.dumps({"inputs": [entry] * count})
    assert 15 << 20 < len(body) < MAX_BODY
    r = httpx.post(gateway.url + "/v2/models/fraud/infer", content=body, timeout=60)
    refused(r, 400, fragment)


# -- header size ----------------------------------------------------------------------------------


def raw_request(gateway: GatewayServer, head: bytes) -> bytes:
    """Send a hand-made request head; the answer, or b"" when the gateway hung up first."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        try:
            sock.sendall(head)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


def get_with(headers: bytes) -> bytes:
    return b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers + b"\r\n"


def status_and_body(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",
        b"X-Big: " + b"a" * (MAX_HEADER + 1) + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(2_000)),
    ],
    ids=["one-100KB-header", "just-over", "2000-small-headers"],
)
def test_oversized_headers_get_431(gateway: GatewayServer, headers: bytes) -> None:
    status, body = status_and_body(raw_request(gateway, get_with(headers)))
    assert status == 431
    assert body == {"error": f"request line and headers exceed the limit of {MAX_HEADER} bytes"}
    still_serving(gateway)


def test_headers_under_the_limit_are_served(gateway: GatewayServer) -> None:
    answer = raw_request(gateway, get_with(b"X-Big: " + b"a" * (MAX_HEADER - 200) + b"\r\n"))
    assert status_and_body(answer) == (200, {"live": True})


def test_a_header_that_never_ends_is_cut_off(gateway: GatewayServer) -> None:
    """10 MB of one header value: the gateway stops reading within one read of the limit and
    answers 431, or hangs up while the client is still sending; either way it keeps serving."""
    answer = raw_request(gateway, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 10_000_000)
    if answer:
        assert status_and_body(answer)[0] == 431
    still_serving(gateway)


def test_a_long_url_counts_against_the_header_limit(gateway: GatewayServer) -> None:
    path = b"/v2/models/" + b"m" * (MAX_HEADER + 1) + b"/ready"
    answer = raw_request(gateway, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status_and_body(answer)[0] == 431
