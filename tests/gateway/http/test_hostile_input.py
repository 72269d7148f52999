"""Client input that used to answer 500 (issue 14, finding 8): numbers in headers and query
strings that ``str.isdigit`` accepts and ``int`` refuses ('²'), or too long for ``int`` (more
than 4,300 digits). Each is a 400 in the protocol's error format, naming the field, and
changes nothing."""

from __future__ import annotations

import httpx
import pytest

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.http.responses import check_declared_length
from tests.support.server import ADMIN, GatewayServer

BODY = b'{"inputs": []}'
HUGE = "9" * 5_000


@pytest.mark.parametrize("value", ["9" * 4_301, "²", "-1", "1e3", "٣"])
def test_inference_header_length_must_be_a_small_integer(server: GatewayServer, value: str) -> None:
    r = httpx.post(
        server.url + "/v2/models/fraud/infer",
        content=BODY,
        headers={b"Inference-Header-Content-Length": value.encode()},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("Inference-Header-Content-Length: ")


@pytest.mark.parametrize("limit", ["²", "9" * 5_001, "0", "10001", "١٢"])
def test_audit_limit_must_be_an_integer_in_range(server: GatewayServer, limit: str) -> None:
    r = httpx.get(server.url + "/admin/audit", params={"limit": limit}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("limit: ")


@pytest.mark.parametrize("tag", [HUGE, f'"{HUGE}"', "²", '"1.5"'])
def test_if_match_must_be_a_revision_number(server: GatewayServer, tag: str) -> None:
    before = httpx.get(server.url + "/admin/audit", headers=ADMIN).json()["entries"]
    r = httpx.put(
        server.url + "/admin/routes/fraud",
        json={"policy": {"strategy": "single", "version": "1"}, "reason": "hostile"},
        headers={
            **{k.encode(): v.encode() for k, v in ADMIN.items()},
            b"If-Match": tag.encode(),
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("If-Match: ")
    assert httpx.get(server.url + "/admin/audit", headers=ADMIN).json()["entries"] == before


@pytest.mark.parametrize(
    "declared", [b"9" * 19, b"9" * 4_301, "²".encode(), b"-1", b"1e3", b"", "9" * 30]
)
def test_a_content_length_that_is_no_length_is_400(declared: bytes | str) -> None:
    """HTTP servers refuse most of these before the app; a server that passes them on (or an
    ASGI caller) gets a 400 naming the header, from the raw bytes the request path reads and
    from a decoded string alike."""
    with pytest.raises(BadRequest) as exc:
        check_declared_length(declared, 1 << 62)
    assert exc.value.message.startswith("Content-Length: ")


@pytest.mark.parametrize("declared", [b"101", b"000101", b" 101 ", "101", b"9" * 18])
def test_a_content_length_above_the_cap_is_413(declared: bytes | str) -> None:
    with pytest.raises(PayloadTooLarge):
        check_declared_length(declared, 100)
    check_declared_length(b"100", 100)
    check_declared_length(b"0", 100)
