"""The soak (loadtests/soak.py) run short. Steady load with a policy change every second: no
unexpected answer, and resident memory grows by under 10 % from the end of the warm-up.

Every run is a 15 s smoke run of the same checks (10 s measured after the 5 s warm-up).
``TURNOUT_SOAK_S`` sets the length in seconds for a longer run, such as a nightly job's
``TURNOUT_SOAK_S=600 pytest tests/system/test_soak.py`` (more than the warm-up, and at least
``len(POLICIES) + 2`` so that every policy is installed).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from loadtests.soak import POLICIES, soak
from tests.support.load import figures
from tests.support.server import ADMIN_TOKEN, Server

SECONDS = float(os.environ.get("TURNOUT_SOAK_S") or 15.0)
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
