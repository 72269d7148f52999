"""Cost of one inference request inside the server process, without the network: the ASGI apps
of Turnout (monitors on, monitors off) and of the bare starlette + onnxruntime handler, called
in turn in one process on one event loop with the same JSON body (fraud, batch 1), each round
``n`` requests per app. Prints µs per request (median over rounds) and the paired ratios.

Run: ``.venv/bin/python -m loadtests.handler_cost [--rounds 8] [-n 10000] [--policy canary]``;
pin it to one CPU (``taskset -c 1``) on a shared machine. ``loadtests.run`` calls ``measure``
too. ``--policy canary`` routes both Turnout apps through a 50 % canary (the route table's
choose, served counts and the feedback join on every request) instead of the default route;
``--id ID`` sends an inference id, which the outcome join records for a model with a task.
Between requests the event loop turns once (``asyncio.sleep(0)``), as it does in a server
reading its sockets: background tasks that fall due (the quality flush, the monitors') run
then, inside the timed rounds, and buffers they drain do not pile up as in a loop that never
yields (a held buffer made the collector's passes cost Turnout up to 2 µs a request here).
``--clock cpu`` times rounds by the event loop thread's CPU time instead of wall time: on a
machine other processes keep busy it moves much less (threads the request path hands work to,
such as a writer thread, are then not counted: use wall time, pinned, for those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from gateway.app import create_app
from gateway.demo import write_demo_repository
from gateway.settings import Settings
from loadtests.bare import create_app as bare_app

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]
APPS = ("turnout", "turnout-monitors", "bare")  # the names loadtests.results uses
PATH = "/v2/models/fraud/infer"
TOKEN = "handler-cost-token"
POLICIES: dict[str, dict[str, Any]] = {
    "canary": {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.5, "seed": 0},
}


def request_body(repo: Path, request_id: str | None = None) -> bytes:
    row = np.load(repo / "fraud" / "1" / "reference.npy")[0].astype(np.float32)
    tensor = {"name": "input", "shape": [1, row.size], "datatype": "FP32", "data": row.tolist()}
    body: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        body["id"] = request_id
    return orjson.dumps(body)


def _scope(
    body: bytes, method: str = "POST", path: str = PATH, auth: bool = False
) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if auth:
        headers.append((b"authorization", f"Bearer {TOKEN}".encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _call(
    app: ASGIApp, body: bytes, method: str = "POST", path: str = PATH, auth: bool = False
) -> None:
    delivered = False
    status = 0

    async def receive() -> MutableMapping[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(body, method, path, auth), receive, send)
    if status != 200:
        raise RuntimeError(f"{method} {path} answered {status}")


# How a round is timed: wall time, or the CPU time of the thread that runs the event loop (the
# apps run on it; a batch-1 ``fraud`` run stays on it too), which a busy machine's other
# processes inflate much less than wall time.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


async def started(
    stack: contextlib.AsyncExitStack, settings: Settings, policy: str | None = None
) -> Any:
    """A Turnout app with its models loaded (its lifespan held by ``stack``), ``fraud`` routed
    through ``POLICIES[policy]`` when one is given."""
    app = create_app(settings)
    await stack.enter_async_context(app.router.lifespan_context(app))
    while not app.state.endpoints.registry.started:
        await asyncio.sleep(0.05)
    if policy is not None:
        put = orjson.dumps({"policy": POLICIES[policy], "reason": "benchmark"})
        await _call(app, put, "PUT", "/admin/routes/fraud", auth=True)
    return app


async def _per_request_us(
    app: ASGIApp, body: bytes, n: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    start = clock()
    for _ in range(n):
        await _call(app, body)
        await asyncio.sleep(0)  # the loop turns between requests, as a server's does
    return (clock() - start) / n * 1e6


async def _measure(
    repo: Path,
    rounds: int,
    n: int,
    policy: str | None = None,
    request_id: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    body = request_body(repo, request_id)
    async with contextlib.AsyncExitStack() as stack:
        apps: dict[str, Any] = {}
        for name, monitors in (("turnout", True), ("turnout-monitors", False)):
            # TURNOUT_LIMITS=FILE: the cost of a rate-limits document (gateway.http.limits)
            # (passed only when set, so that this script runs on earlier commits too:
            # loadtests.compare_commits)
            limits = os.environ.get("TURNOUT_LIMITS")
            extra: dict[str, Any] = {"limits": Path(limits)} if limits else {}
            settings = Settings(repo, monitors=monitors, admin_tokens={"bench": TOKEN}, **extra)
            apps[name] = await started(stack, settings, policy)
        apps["bare"] = bare_app(repo, ["fraud"])
        for app in apps.values():  # warm every path (and the CPU caches' view of it)
            await _per_request_us(app, body, 500)
        results: dict[str, list[float]] = {name: [] for name in apps}
        order = list(apps)
        for i in range(rounds):  # alternate the order: what runs first in a round pays more
            for name in order if i % 2 == 0 else order[::-1]:
                results[name].append(await _per_request_us(apps[name], body, n, clock))
        return results


def measure(
    repo: Path,
    rounds: int = 8,
    n: int = 10_000,
    policy: str | None = None,
    request_id: str | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """µs per request of each app in ``APPS``, one figure per round, by ``clock`` (CLOCKS)."""
    return uvloop.run(_measure(repo, rounds, n, policy, request_id, CLOCKS[clock]))


def paired_ratio(results: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of throughput(a) / throughput(b) = time(b) / time(a)."""
    return statistics.median(tb / ta for ta, tb in zip(results[a], results[b], strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.handler_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("-n", type=int, default=10_000, help="requests per app per round")
    p.add_argument("--policy", choices=sorted(POLICIES), help="route Turnout through a policy")
    p.add_argument(
        "--id",
        dest="request_id",
        help="send this inference id with every request (the outcome join records it)",
    )
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time rounds by wall time or by the event loop thread's CPU time",
    )
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        results = measure(repo, a.rounds, a.n, a.policy, a.request_id, a.clock)
    for name, values in results.items():
        print(f"{name:18s} {statistics.median(values):7.1f} µs/request (median of {a.rounds})")
    on_off = paired_ratio(results, "turnout", "turnout-monitors")
    print(f"throughput, monitors on ÷ off: {on_off:.3f} (median of paired rounds)")
    print(f"throughput, Turnout ÷ bare:    {paired_ratio(results, 'turnout', 'bare'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
