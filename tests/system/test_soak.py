"""The soak (loadtests/soak.py) run short: about 60 s in CI, 20 s elsewhere. Steady load with a
policy change every second: no unexpected answer, and resident memory grows by under 10 %
from the end of the warm-up."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from loadtests.soak import POLICIES, soak
from tests.support.load import figures
from tests.support.server import ADMIN_TOKEN, Server

SECONDS = 60.0 if os.environ.get("CI") == "true" else 20.0
WARMUP_S = 5.0


def test_a_short_soak_has_no_failures_and_bounded_memory(demo_repo: Path) -> None:
    # a short feedback TTL: the join's cache reaches its steady size within the warm-up
    with Server(demo_repo, args=["--feedback-ttl-s", "3"]) as gateway:
        assert gateway.process is not None
        result = asyncio.run(
            soak(
                gateway.url,
                gateway.process.pid,
                SECONDS,
                admin_token=ADMIN_TOKEN,
                concurrency=8,
                warmup_s=WARMUP_S,
            )
        )
    figures("soak", summary=result.summary().replace("\n", "; "))
    assert result.sent >= 20 * SECONDS
    assert result.statuses == {200: result.sent}
    assert result.policy_changes >= SECONDS - 2 >= len(POLICIES)
    assert result.policy_failures == 0
    assert result.feedback_sent > 0 and result.feedback_failures == 0
    assert result.rss_growth < 0.10, result.rss_kib
