"""What the prediction log costs at 100 % sampling on the light model (``fraud``, batch 1).

In process (``loadtests.handler_cost``'s method): two Turnout apps in one process on one event
loop, the log off and the log on (every request recorded to a gzip JSONL directory), called in
turn with the same bodies (512 distinct reference rows, cycled), paired rounds; the ratio of
their throughputs is the median over rounds. Beside it: the writer thread's CPU per record (its
own CPU clock over the records it wrote) and the request path's (``PredictionLog.offer`` alone).

Over HTTP: wrk (loadtests/wrk.py) against a real ``turnout serve`` process, log off then on, in
alternating runs, server on CPU 1 and wrk on CPU 0 by default (as loadtests/run.py); medians.

Run: ``python -m loadtests.prediction_log_cost [--rounds 6] [-n 5000] [--http-runs 3]
[--write]``; pin the in-process part with ``taskset -c 1`` (the HTTP part pins itself).
``--write`` replaces the prediction log section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from gateway.app import create_app
from gateway.background.prediction_records import Queued
from gateway.background.predictions import PredictionLog
from gateway.demo import write_demo_repository
from gateway.serving.registry import Registry
from gateway.settings import Settings
from loadtests import compare_commits
from loadtests.handler_cost import _call, paired_ratio, request_body
from loadtests.harness import ServerProcess, free_port
from loadtests.wrk import WrkPoint, run_wrk

START, END = "<!-- prediction-log-cost -->", "<!-- /prediction-log-cost -->"


def _writer_cpu_s() -> float:
    """CPU seconds of the prediction log's writer thread so far (0 when there is none)."""
    for thread in threading.enumerate():
        if thread.name == "turnout-predictions" and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


def request_bodies(repo: Path, count: int = 512) -> list[bytes]:
    """Batch-1 bodies of distinct reference rows: logged records that compress as real traffic
    does (the same body every time would make the log's gzip nearly free)."""
    rows = np.load(repo / "fraud" / "1" / "reference.npy")[:count].astype(np.float32)
    return [
        orjson.dumps({"inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                                  "data": row.tolist()}]})
        for row in rows
    ]  # fmt: skip


async def _per_request_us(app: Any, bodies: list[bytes], n: int) -> float:
    start = time.perf_counter()
    count = len(bodies)
    for i in range(n):
        await _call(app, bodies[i % count])
    return (time.perf_counter() - start) / n * 1e6


async def _measure(repo: Path, log_dir: Path, rounds: int, n: int) -> dict[str, Any]:
    body = request_bodies(repo)
    async with contextlib.AsyncExitStack() as stack:
        apps: dict[str, Any] = {}
        on: dict[str, Any] = {"prediction_log_sample": {"fraud": 1.0}}
        on["prediction_log_dir"] = log_dir
        for name, extra in (("log off", {}), ("log on", on)):
            app = create_app(Settings(repo, **extra))
            await stack.enter_async_context(app.router.lifespan_context(app))
            while not app.state.endpoints.registry.started:
                await asyncio.sleep(0.05)
            apps[name] = app
        for app in apps.values():
            await _per_request_us(app, body, 500)
        results: dict[str, list[float]] = {name: [] for name in apps}
        order = list(apps)
        cpu_before = _writer_cpu_s()
        for i in range(rounds):
            for name in order if i % 2 == 0 else order[::-1]:
                results[name].append(await _per_request_us(apps[name], body, n))
        await asyncio.sleep(0.5)  # the writer's last batch
        writer_s = _writer_cpu_s() - cpu_before
        offer_us = _offer_us(apps["log on"].state.endpoints.registry)
        return {
            "results": results,
            "writer_us": writer_s / (rounds * n) * 1e6,
            "offer_us": offer_us,
        }


class _Discard:
    """A sink that keeps nothing (the offer is timed alone, never drained)."""

    def write(self, taken: Sequence[Queued], lines: list[bytes]) -> int:
        return 0

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def _offer_us(registry: Registry, n: int = 100_000) -> float:
    """µs of one ``offer`` as the request path makes it (sampled, queued), median of 5."""
    loaded = registry.latest("fraud")
    row = np.ones((1, 32), np.float32)
    inputs, outputs = {"input": row}, {"probability": np.ones((1, 1), np.float32)}
    figures = []
    for _ in range(5):
        log = PredictionLog({"fraud": 1.0}, _Discard(), max_records=n + 1, max_bytes=1 << 40)
        offer = log.offer
        start = time.perf_counter()
        for _ in range(n):
            offer("id", None, loaded.info, "default", None, None, inputs, outputs, "addr:x")
        figures.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(figures)


def in_process(rounds: int, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        out = uvloop.run(_measure(repo, Path(tmp) / "log", rounds, n))
        out["file_bytes"] = sum(p.stat().st_size for p in (Path(tmp) / "log").iterdir())
    return out


def over_http(
    runs: int, duration_s: float, connections: int, server_cpus: str | None, wrk_cpus: str | None
) -> dict[str, list[WrkPoint]]:
    """wrk runs of ``turnout serve`` with the log off and on, alternating, ``runs`` each."""
    figures: dict[str, list[WrkPoint]] = {"log off": [], "log on": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(request_body(repo))
        for i in range(runs):
            for name in ("log off", "log on") if i % 2 == 0 else ("log on", "log off"):
                port = free_port()
                args = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo)]
                args += ["--port", str(port), "--log-level", "warning"]
                if name == "log on":
                    args += ["--prediction-log-sample", "fraud=1"]
                    args += ["--prediction-log-dir", str(Path(tmp) / f"log{i}")]
                server = ServerProcess(
                    name.replace(" ", "-"), args, port, Path(tmp), cpus=server_cpus
                )
                server.start()
                try:
                    server.wait_ready()
                    url = f"{server.url}/v2/models/fraud/infer"
                    run_wrk(url, body_path, connections=connections, duration_s=2, cpus=wrk_cpus)
                    point = run_wrk(
                        url, body_path, connections=connections, duration_s=duration_s,
                        cpus=wrk_cpus, server_cpu=server.cpu_seconds,
                    )  # fmt: skip
                finally:
                    server.stop()
                if point.error:
                    raise RuntimeError(point.error)
                figures[name].append(point)
    return figures


def section(
    inproc: dict[str, Any], http: dict[str, list[WrkPoint]], args: argparse.Namespace
) -> str:
    results = inproc["results"]
    ratio = paired_ratio(results, "log on", "log off")
    off, on = (statistics.median(results[k]) for k in ("log off", "log on"))
    lines = [
        START,
        "## Prediction log at 100 % sampling (`fraud`, batch 1)",
        "",
        f"`python -m loadtests.prediction_log_cost --rounds {args.rounds} -n {args.n} "
        f"--http-runs {args.http_runs}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}). In process: two apps in "
        "one process pinned to one CPU, paired rounds; every request of `log on` is recorded to "
        "a gzip JSONL directory by the writer thread, which shares that CPU.",
        "",
        "| in process | µs/request (median) | throughput ÷ log off |",
        "|---|---|---|",
        f"| log off | {off:.1f} | 1.000 |",
        f"| log on (100 %) | {on:.1f} | {ratio:.3f} |",
        "",
        f"Per record: request path (`offer`, timed alone) {inproc['offer_us']:.2f} µs; writer "
        f"thread {inproc['writer_us']:.2f} µs of CPU (records built, one `orjson.dumps` per "
        f"batch, gzip level 1); {inproc['file_bytes'] / (args.rounds * args.n):.0f} bytes per "
        "record on disk.",
    ]
    if http["log off"]:
        rps = {k: [p.rps for p in v] for k, v in http.items()}
        cpu = {k: [p.server_cpu_us_per_request for p in v] for k, v in http.items()}
        other = statistics.median(p.other_cpu for v in http.values() for p in v)
        r_off, r_on = (statistics.median(rps[k]) for k in ("log off", "log on"))
        c_off, c_on = (statistics.median(cpu[k]) for k in ("log off", "log on"))

        def each(values: list[float]) -> str:
            return ", ".join(f"{x:.0f}" for x in values)

        lines += [
            "",
            f"Over HTTP: `turnout serve` on CPUs {args.server_cpus or 'any'}, wrk on CPUs "
            f"{args.wrk_cpus or 'any'} ({args.connections} connections, "
            f"{args.duration:.0f} s runs, {args.http_runs} runs each, alternating; one body, "
            "so the records compress better than real traffic's). The server's CPU per request "
            "(its process tree, writer thread included) is the steadier figure on a shared "
            f"machine: other tenants took a median {other:.2f} of a CPU during the runs.",
            "",
            "| HTTP | req/s (median) | runs | server CPU µs/request (median) | runs |",
            "|---|---|---|---|---|",
            f"| log off | {r_off:.0f} | {each(rps['log off'])} | {c_off:.0f} "
            f"| {each(cpu['log off'])} |",
            f"| log on (100 %) | {r_on:.0f} | {each(rps['log on'])} | {c_on:.0f} "
            f"| {each(cpu['log on'])} |",
            "",
            f"Log on ÷ off: req/s {r_on / r_off:.3f}; CPU per request {c_on / c_off:.3f} (a "
            f"throughput of {c_off / c_on:.3f} where the server's CPU is the limit).",
        ]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.prediction_log_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("-n", type=int, default=5000, help="requests per app per round")
    p.add_argument("--http-runs", type=int, default=3, help="wrk runs per setting (0: none)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--server-cpus", default="1", help="taskset list for the server ('': any)")
    p.add_argument("--wrk-cpus", default="0", help="taskset list for wrk ('': any)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    inproc = in_process(args.rounds, args.n)
    http: dict[str, list[WrkPoint]] = {"log off": [], "log on": []}
    if args.http_runs:
        cpus = (args.server_cpus or None, args.wrk_cpus or None)
        http = over_http(args.http_runs, args.duration, args.connections, *cpus)
    text = section(inproc, http, args)
    print(text)
    if args.write:
        compare_commits.write(text, START, END)
        print(f"wrote {compare_commits.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
