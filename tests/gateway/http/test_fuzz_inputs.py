"""Hypothesis throws arbitrary text into every header and query parameter the gateway reads
(issue 14, finding 8: a 4,301-digit Inference-Header-Content-Length, ``limit=²`` and a
5,000-digit If-Match each answered 500). Unicode digits, digit strings past Python's int limit,
negative numbers, whitespace, any text: never a 5xx. Requests are written on a raw socket, so
every header byte is the generated one (an HTTP client would check or rewrite some)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.server import ADMIN, InProcessServer

KEY = "fuzz-inputs-key-0123456789"
INFER = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
)
POLICY = orjson.dumps({"policy": {"strategy": "single", "version": "1"}, "reason": "fuzz"})
SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# Text a number parser meets: any text, Unicode digits ('²', '٣'), digits past int()'s 4,300,
# signs, exponents, surrounding whitespace, quotes (as in an ETag).
NUMBERS = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=12),
    st.integers(4_290, 6_000).map(lambda n: "9" * n),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True).map(repr),
    st.tuples(st.sampled_from([" ", "\t", '"', "W/", "+", "-", ""]), st.integers(0, 99)).map(
        lambda p: f"{p[0]}{p[1]}{p[0]}"
    ),
)


def header_safe(text: str) -> bool:
    """A value that keeps the request's framing: no line breaks or NUL (those test the parser,
    not the gateway), at most 60,000 bytes (under the head cap)."""
    return not any(c in text for c in "\r\n\0") and len(text.encode()) <= 60_000


HEADER_VALUES = NUMBERS.filter(header_safe)


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    args = ["--api-key", f"fuzz={KEY}", "--version-override"]
    with InProcessServer(demo_repo, args=args) as s:
        yield s


def status(
    gateway: InProcessServer,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes = b"",
    content_length: str | None = None,
) -> int:
    """The status of one request written byte for byte (its own connection)."""
    length = str(len(body)) if content_length is None else content_length
    head = [f"{method} {target} HTTP/1.1", f"host: 127.0.0.1:{gateway.port}", "connection: close"]
    head += [f"{k}: {v}" for k, v in {**headers, "content-length": length}.items()]
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        s.sendall(raw)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def no_server_error(code: int, what: object) -> None:
    assert 100 <= code < 500, (code, what)


@SETTINGS
@given(value=HEADER_VALUES)
def test_inference_header_content_length(gateway: InProcessServer, value: str) -> None:
    headers = {"x-api-key": KEY, "inference-header-content-length": value}
    no_server_error(status(gateway, "POST", "/v2/models/fraud/infer", headers, INFER), value)


@SETTINGS
@given(value=HEADER_VALUES)
def test_pinned_version_header(gateway: InProcessServer, value: str) -> None:
    headers = {"x-api-key": KEY, "x-turnout-version": value}
    no_server_error(status(gateway, "POST", "/v2/models/fraud/infer", headers, INFER), value)


@SETTINGS
@given(value=HEADER_VALUES)
def test_credentials_headers(gateway: InProcessServer, value: str) -> None:
    for name in ("x-api-key", "authorization"):
        code = status(gateway, "POST", "/v2/models/fraud/infer", {name: value}, INFER)
        no_server_error(code, (name, value))
    no_server_error(status(gateway, "GET", "/admin/routes", {"authorization": value}), value)


@SETTINGS
@given(value=HEADER_VALUES)
def test_if_match(gateway: InProcessServer, value: str) -> None:
    headers = {**ADMIN, "if-match": value}
    no_server_error(status(gateway, "PUT", "/admin/routes/fraud", headers, POLICY), value)


@SETTINGS
@given(value=HEADER_VALUES)
def test_content_length(gateway: InProcessServer, value: str) -> None:
    # A well-formed length other than the body's would leave one side waiting: not this test's.
    body = b"{}"
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 9:
        value = str(len(body))
    headers = {"x-api-key": KEY}
    code = status(gateway, "POST", "/v2/models/fraud/infer", headers, body, content_length=value)
    no_server_error(code, value)


@SETTINGS
@given(
    name=st.sampled_from(["limit", "cursor", "model"]),
    value=st.one_of(NUMBERS, st.text(max_size=200)),
)
def test_audit_query(gateway: InProcessServer, name: str, value: str) -> None:
    target = f"/admin/audit?{name}={quote(value, safe='')}"
    no_server_error(status(gateway, "GET", target, ADMIN), (name, value))


@SETTINGS
@given(value=st.one_of(NUMBERS, st.text(max_size=50)))
def test_other_query_parameters(gateway: InProcessServer, value: str) -> None:
    q = quote(value, safe="")
    no_server_error(status(gateway, "PUT", f"/admin/routes/fraud?dry_run={q}", ADMIN, POLICY), q)
    target = f"/v2/models/fraud/versions/1/drift?scope={q}"
    no_server_error(status(gateway, "GET", target, {"x-api-key": KEY}), q)


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@SETTINGS
@given(timeout=JSON_VALUES)
def test_timeout_parameter(gateway: InProcessServer, timeout: object) -> None:
    doc = orjson.loads(INFER)
    doc["parameters"] = {"timeout": timeout}
    body = orjson.dumps(doc)
    code = status(gateway, "POST", "/v2/models/fraud/infer", {"x-api-key": KEY}, body)
    # 504: the client's own deadline passed (a timeout of a few µs): its choice, not a fault.
    assert code == 504 or 100 <= code < 500, (code, timeout)
