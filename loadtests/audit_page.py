"""How long reading the audit trail holds a gateway's event loop (issue 14, finding 10).

Starts a gateway process (the code of the current directory) on the memory store
or on Redis, writes ``--entries`` audit entries through the admin API, then reads the whole
trail: with ``--limit 10000`` in one request (all a gateway before paging allowed), else a page
of ``--limit`` at a time, following ``next``. A probe process asks ``/v2/health/live`` in a
loop meanwhile; the longest probe answer during a read is the loop's longest stall (a live
probe costs about a millisecond when the loop is free, its median is printed as the floor).

Run: ``.venv/bin/python -m loadtests.audit_page --store memory --limit 1000``; for the code
before paging, from a checkout of it: ``PYTHONPATH=. python /path/to/audit_page.py --limit 10000``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import orjson

from gateway.demo import write_demo_repository
from loadtests.harness import ServerProcess, free_port

TOKEN = "audit-bench-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REASON = "audit page benchmark: a reason of a realistic length, saying why a policy changed " * 2


def probe(url: str, stop: Connection, out: Connection) -> None:
    """(start, seconds) of each liveness answer until told to stop."""
    samples: list[tuple[float, float]] = []
    with httpx.Client(timeout=30.0) as client:
        while not stop.poll():
            t0 = time.monotonic()
            client.get(url + "/v2/health/live")
            samples.append((t0, time.monotonic() - t0))
    out.send(samples)


def fill(client: httpx.Client, url: str, entries: int) -> None:
    for i in range(entries):
        doc = {"strategy": "single", "version": str(1 + i % 2)}
        r = client.put(url + "/admin/routes/fraud", json={"policy": doc, "reason": REASON})
        r.raise_for_status()


def read_trail(client: httpx.Client, url: str, limit: int) -> list[tuple[float, float, int]]:
    """(start, end, bytes) of each request that reads the trail, to its end."""
    windows = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        t0 = time.monotonic()
        r = client.get(url + "/admin/audit", params=params)
        windows.append((t0, time.monotonic(), len(r.content)))
        r.raise_for_status()
        cursor = orjson.loads(r.content).get("next")
        if cursor is None:
            return windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=1_000)
    parser.add_argument("--cpus", default=None, help="taskset CPU list for the gateway")
    o = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="audit-page-"))
    repo = work / "models"
    write_demo_repository(repo, heavy=False)
    port = free_port()
    cmd = [
        sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo),
        "--port", str(port), "--admin-token", f"bench={TOKEN}", "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    if o.store == "redis":
        env["TURNOUT_REDIS_URL"] = o.redis_url
        env["TURNOUT_REDIS_PREFIX"] = f"audit-bench-{uuid.uuid4().hex}:"
    server = ServerProcess("gateway", cmd, port, work, cpus=o.cpus, env=env)
    server.start()
    try:
        server.wait_ready()
        with httpx.Client(timeout=120.0, headers=ADMIN) as client:
            fill(client, server.url, o.entries)
            stop_recv, stop_send = multiprocessing.Pipe(duplex=False)
            out_recv, out_send = multiprocessing.Pipe(duplex=False)
            child = multiprocessing.Process(target=probe, args=(server.url, stop_recv, out_send))
            child.start()
            time.sleep(1.0)  # the probe's floor, with the loop free
            windows = read_trail(client, server.url, o.limit)
            time.sleep(0.5)
            stop_send.send(True)
            samples = out_recv.recv()
            child.join()
    finally:
        server.stop()
    idle = [s for t, s in samples if t < windows[0][0]]
    print(f"{o.store} store, {o.entries} entries, limit {o.limit}, code in {Path.cwd()}")
    print(f"probe floor (loop free): median {statistics.median(idle) * 1e3:.2f} ms")
    for i, (t0, t1, size) in enumerate(windows):
        during = [s for t, s in samples if t0 - 0.05 <= t <= t1]
        stall = max(during, default=0.0)
        print(
            f"read {i + 1}: {size / 1e6:.2f} MB in {(t1 - t0) * 1e3:.1f} ms, "
            f"longest probe answer {stall * 1e3:.1f} ms"
        )
    worst = max(s for t, s in samples if windows[0][0] - 0.05 <= t <= windows[-1][1])
    print(f"longest stall over the whole trail: {worst * 1e3:.1f} ms in {len(windows)} reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
