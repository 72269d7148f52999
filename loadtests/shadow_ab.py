"""The primary's p99 with and without a shadow version, and nothing else running: two gateways on
the light demo model (``turnout``: v2 alone; ``turnout+shadow``: v2 with v1 shadowing every
request, as in ``loadtests.run``), open loop at each rate, the two alternating each repeat.
Prints each point, then per rate the median p99s, their ratio and the median of paired ratios.

Run: ``.venv/bin/python -m loadtests.shadow_ab [--rates 1160,2320] [--repeats 6] [--duration 8]``.
Servers run on CPU 1 and wrk on CPU 0 when the machine has two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from gateway.demo import write_demo_repository
from loadtests.handler_cost import request_body
from loadtests.harness import ServerProcess
from loadtests.run import ADMIN_TOKEN, POLICIES, gateway
from loadtests.wrk import WrkPoint, run_wrk

CONFIGS = ("turnout", "turnout+shadow")
CONNECTIONS = 32


def start(name: str, repo: Path, work: Path, cpus: str | None) -> ServerProcess:
    server = gateway(name, repo, work, cpus, work / "numba-cache")
    server.start()
    server.wait_ready()
    policy = POLICIES.get(name)
    if policy is not None:
        r = httpx.put(
            f"{server.url}/admin/routes/fraud",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            json={"policy": policy, "reason": "shadow A/B"},
            timeout=30,
        )
        r.raise_for_status()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.shadow_ab", description=__doc__)
    p.add_argument("--rates", default="1160,2320", help="offered req/s, comma-separated")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    a = p.parse_args(argv)
    server_cpus, client_cpus = ("1", "0") if (os.cpu_count() or 1) >= 2 else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "models"
        write_demo_repository(repo, heavy=False)
        body = work / "body.json"
        body.write_bytes(request_body(repo))
        servers = {name: start(name, repo, work, server_cpus) for name in CONFIGS}
        try:
            for rate in (int(r) for r in a.rates.split(",")):
                points: dict[str, list[WrkPoint]] = {name: [] for name in CONFIGS}
                for rep in range(a.repeats):
                    for name in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
                        point = run_wrk(
                            f"{servers[name].url}/v2/models/fraud/infer",
                            body,
                            connections=CONNECTIONS,
                            duration_s=a.duration,
                            rate_per_connection=rate / CONNECTIONS,
                            cpus=client_cpus,
                            server_cpu=servers[name].cpu_seconds,
                        )
                        points[name].append(point)
                        time.sleep(0.5)
                        print(
                            f"{rate} #{rep} {name:15s} {point.rps:6.0f} req/s "
                            f"p50 {point.p50_us / 1e3:.3f} p99 {point.p99_us / 1e3:.3f} ms "
                            f"server CPU {point.server_cpu:.0%}",
                            flush=True,
                        )
                off, on = (statistics.median(x.p99_us for x in points[n]) for n in CONFIGS)
                paired = statistics.median(
                    with_.p99_us / without.p99_us
                    for without, with_ in zip(*points.values(), strict=True)
                )
                print(
                    f"{rate} req/s: p99 {off / 1e3:.2f} ms without a shadow, {on / 1e3:.2f} ms "
                    f"with; ratio of medians {on / off:.2f}, median of paired ratios {paired:.2f}"
                )
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
