"""Where a request's time goes, function by function: the Turnout ASGI app (monitors on) called
in process on the same ``fraud`` request as ``loadtests.handler_cost``, under cProfile, printing
calls and self time per request for every function. Call counts do not depend on the machine's
load, so two commits profiled in turn (one run each, with ``PYTHONPATH`` set to a worktree of
each) show what a change added to the request path even on a busy machine; the times are
cProfile's (inflated by its overhead) and only rank the functions.

Run: ``.venv/bin/python -m loadtests.call_profile [--policy canary] [-n 3000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import tempfile
from collections.abc import Sequence
from pathlib import Path

import uvloop

from gateway.demo import write_demo_repository
from gateway.settings import Settings
from loadtests.handler_cost import POLICIES, TOKEN, _call, request_body, started


async def profile(n: int, policy: str | None) -> list[tuple[float, float, str]]:
    """(calls per request, self µs per request, function) for every function, by self time."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_demo_repository(repo, heavy=False)
        body = request_body(repo)
        async with contextlib.AsyncExitStack() as stack:
            settings = Settings(repo, monitors=True, admin_tokens={"bench": TOKEN})
            app = await started(stack, settings, policy)
            for _ in range(1000):  # warm every path first
                await _call(app, body)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(n):
                await _call(app, body)
            profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [
        (calls / n, self_s / n * 1e6, f"{Path(file).name}:{line}:{name}")
        for (file, line, name), (_, calls, self_s, _, _) in stats.items()
    ]
    return sorted(rows, key=lambda row: -row[1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.call_profile", description=__doc__)
    p.add_argument("-n", type=int, default=3000, help="requests profiled")
    p.add_argument("--policy", choices=sorted(POLICIES), help="route through a policy")
    args = p.parse_args(argv)
    rows = uvloop.run(profile(args.n, args.policy))
    print(f"calls per request: {sum(row[0] for row in rows):.1f}")
    for calls, self_us, name in rows:
        print(f"{calls:7.2f} {self_us:8.2f} µs  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
