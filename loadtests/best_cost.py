"""The in-process cost of one light request as the *fastest* of many short batches: Turnout's
ASGI app (monitors on) and the bare starlette + onnxruntime handler, called in turn on one event
loop with the same batch-1 ``fraud`` body, ``batches`` batches of ``n`` requests each. A batch a
few milliseconds long often runs without being interrupted even on a busy machine, so the
minimum (and a low percentile) over many batches moves far less with other processes' load than
a median of long rounds (loadtests.handler_cost): use it to compare two commits while the
machine is shared, and handler_cost (whose medians include the batches in which a background
task ran, which the fastest batches leave out) on a quiet machine for the figures to publish.

Run: ``.venv/bin/python -m loadtests.best_cost [--policy canary] [--batches 1000] [-n 20]``
(pinned: ``taskset -c 1``); with ``PYTHONPATH`` set to a worktree of another commit (and this
file and handler_cost.py, bare.py copied into it) to compare commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from gateway.demo import write_demo_repository
from gateway.settings import Settings
from loadtests.bare import create_app as bare_app
from loadtests.handler_cost import POLICIES, TOKEN, _call, request_body, started


async def _batches(repo: Path, policy: str | None, batches: int, n: int) -> dict[str, list[float]]:
    body = request_body(repo)
    async with contextlib.AsyncExitStack() as stack:
        settings = Settings(repo, monitors=True, admin_tokens={"bench": TOKEN})
        app = await started(stack, settings, policy)
        apps: dict[str, Any] = {"turnout": app, "bare": bare_app(repo, ["fraud"])}
        for each in apps.values():
            for _ in range(1000):
                await _call(each, body)
        times: dict[str, list[float]] = {name: [] for name in apps}
        clock = time.perf_counter
        for i in range(batches):
            for name in apps if i % 2 == 0 else reversed(apps):
                each = apps[name]
                start = clock()
                for _ in range(n):
                    await _call(each, body)
                    await asyncio.sleep(0)  # as handler_cost: the loop turns between requests
                times[name].append((clock() - start) / n * 1e6)
        return times


def fastest(times: list[float]) -> float:
    """The mean of the fastest 2 % of batches (at least 3): a minimum less at the mercy of one
    lucky batch."""
    k = max(3, len(times) // 50)
    return statistics.fmean(sorted(times)[:k])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.best_cost", description=__doc__)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("-n", type=int, default=20, help="requests per batch")
    p.add_argument("--policy", choices=sorted(POLICIES), help="route Turnout through a policy")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        times = uvloop.run(_batches(repo, a.policy, a.batches, a.n))
    low = {name: fastest(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} fastest {low[name]:6.2f} µs  min {min(t):6.2f} µs  median "
              f"{statistics.median(t):6.2f} µs")  # fmt: skip
    print(f"Turnout ÷ bare (fastest): {low['bare'] / low['turnout']:.3f}")
    print(f"Turnout − bare (fastest): {low['turnout'] - low['bare']:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
