"""Refused credentials and echoed client values (issue 14, finding 11). A refusal used to log a
line with the whole path (60 KB lines, one per request); now paths are cut to 200 characters,
each reason logs at most 10 lines per 10 s and then one line saying the rest is not logged, and
``turnout_refused_total{reason}`` counts every refusal. Error messages cut the client values
they quote the same way (gateway.errors.cut)."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.errors import SHOWN_CHARS
from gateway.http.refusals import LINES_PER_WINDOW, WINDOW_S, Refusals
from tests.support.server import ADMIN, InProcessServer

KEY = "flood-test-key-0123456789"
LONG = "x" * 60_000
# The longest line a refusal may log: the format, a cut path, an address and a fixed reason.
MAX_LINE = 600


@pytest.fixture(scope="module")
def gateway(demo_repo: Path) -> Iterator[InProcessServer]:
    args = ["--api-key", f"flood={KEY}", "--version-override"]
    with InProcessServer(demo_repo, args=args) as s:
        yield s


def refused_total(gateway: InProcessServer) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics").text
    found = re.findall(r'^turnout_refused_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(n) for reason, n in found}


@pytest.mark.slow  # 60 MB of request lines: ~25 s here
def test_a_thousand_refusals_with_60_kb_paths_log_a_bounded_number_of_short_lines(
    gateway: InProcessServer,
) -> None:
    before = refused_total(gateway)
    logged = len(gateway.log().splitlines())
    start = time.monotonic()
    with httpx.Client(base_url=gateway.url) as client:
        for i in range(500):
            r = client.post(f"/v2/models/{LONG}{i}/infer", content=b"{}")
            assert r.status_code == 401
            r = client.get(f"/admin/routes/{LONG}{i}")
            assert r.status_code == 401
    elapsed = time.monotonic() - start
    after = refused_total(gateway)
    assert after["missing"] - before.get("missing", 0) == 1_000
    assert set(after) == {"missing", "malformed", "invalid", "expired", "disabled"}

    lines = [ln for ln in gateway.log().splitlines()[logged:] if "refused" in ln]
    # Per reason and window: LINES_PER_WINDOW lines and the one saying the rest is not logged.
    windows = math.ceil(elapsed / WINDOW_S) + 1
    assert 0 < len(lines) <= (LINES_PER_WINDOW + 1) * windows, (len(lines), elapsed)
    assert max(map(len, lines)) <= MAX_LINE
    assert "more characters]" in lines[0] and LONG[: SHOWN_CHARS - 20] in lines[0]


def test_refusal_lines_per_reason_are_limited_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = Refusals(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="turnout"):
        for _ in range(25):
            refusals.refused("invalid", "refused a bad key")
        refusals.refused("missing", "refused no key")  # another reason has its own window
        assert len(caplog.records) == LINES_PER_WINDOW + 2
        assert "not logging them" in caplog.records[LINES_PER_WINDOW].getMessage()
        now[0] = WINDOW_S + 0.1
        refusals.refused("invalid", "refused a bad key")
    last = caplog.records[-1].getMessage()
    assert last.startswith("refused a bad key") and "15 more refused for invalid" in last
    assert refusals.counts["invalid"] == 26 and refusals.counts["missing"] == 1


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text[:300]
    message: str = r.json()["error"]
    assert len(message) < 1_200 and "more characters]" in message, message[:300]
    return message


def test_messages_cut_the_client_values_they_echo(gateway: InProcessServer) -> None:
    key = {"X-API-Key": KEY}
    with httpx.Client(base_url=gateway.url, headers=key) as c:
        assert error(c.post(f"/v2/models/{LONG}/infer", content=b"{}"), 404).startswith(
            "unknown model 'xxx"
        )
        error(c.post(f"/v2/models/fraud/versions/{LONG}/infer", content=b"{}"), 404)
        assert "unknown version" in error(
            c.post("/v2/models/fraud/infer", content=b"{}", headers={"x-turnout-version": LONG}),
            404,
        )
        error(c.get(f"/v2/models/{LONG}"), 404)
        error(c.get(f"/nowhere/{LONG}"), 404)
    policy = {"strategy": "single", "version": "1", LONG: 1}
    r = httpx.put(
        gateway.url + "/admin/routes/fraud",
        json={"policy": policy, "reason": "flood"},
        headers=ADMIN,
    )
    assert error(r, 400).startswith("policy.xxx")
    r = httpx.put(
        gateway.url + "/admin/routes/fraud",
        json={"policy": {"strategy": "single", "version": "1"}, "reason": "x", LONG: 1},
        headers=ADMIN,
    )
    assert error(r, 400).startswith("xxx")
