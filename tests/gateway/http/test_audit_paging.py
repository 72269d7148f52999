"""GET /admin/audit a page at a time (issue 14, finding 10): ``limit`` at most 1,000 (a 400
naming it beyond), a cursor returned as ``next`` that pages on through entries appended between
reads, and a 400 naming ``cursor`` for one the API did not return. The stores' paging is tested
on both stores in tests/router/state/test_store.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import ADMIN, InProcessServer


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(demo_repo) as s:
        yield s


def put(gateway: InProcessServer, version: str, reason: str) -> None:
    r = httpx.put(
        gateway.url + "/admin/routes/fraud",
        json={"policy": {"strategy": "single", "version": version}, "reason": reason},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("limit", ["1001", "10000"])
def test_audit_limit_is_at_most_a_thousand(gateway: InProcessServer, limit: str) -> None:
    r = httpx.get(gateway.url + "/admin/audit", params={"limit": limit}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("limit: ") and "1000" in r.json()["error"]


@pytest.mark.parametrize("cursor", ["", "abc", "0", "²", "9" * 5_000])
def test_a_cursor_the_api_did_not_return_is_a_400(gateway: InProcessServer, cursor: str) -> None:
    r = httpx.get(gateway.url + "/admin/audit", params={"cursor": cursor}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("cursor: ")


def test_paging_through_the_trail_while_it_grows(gateway: InProcessServer) -> None:
    for i in range(7):
        put(gateway, str(1 + i % 2), f"before {i}")
    first = httpx.get(gateway.url + "/admin/audit", params={"limit": 3}, headers=ADMIN).json()
    expected = httpx.get(gateway.url + "/admin/audit", params={"limit": 1000}, headers=ADMIN)
    reasons = [first["entries"][0]["reason"]]
    seen = [e["reason"] for e in first["entries"]]
    cursor = first["next"]
    assert isinstance(cursor, str) and len(first["entries"]) == 3
    while cursor is not None:
        put(gateway, "1", "appended while paging")
        page = httpx.get(
            gateway.url + "/admin/audit", params={"limit": 3, "cursor": cursor}, headers=ADMIN
        ).json()
        seen += [e["reason"] for e in page["entries"]]
        cursor = page["next"]
    assert reasons == ["before 6"]
    assert seen == [e["reason"] for e in expected.json()["entries"]]  # nothing repeated or lost
    assert "appended while paging" not in seen
    assert set(expected.json()) == {"entries", "next"} and expected.json()["next"] is None
