"""What the prediction log costs at 100 % sampling on the light model (``fraud``, batch 1).

In process (``loadtests.handler_cost``'s method): Turnout apps in one process on one event loop,
pinned to one CPU, called in turn with the same bodies (512 distinct reference rows, cycled),
paired rounds; the ratio of their throughputs is the median over rounds. ``log off`` is the
default gateway; the two ``log on`` apps record every request to a gzip JSONL directory, one
with its writer process on the gateway's CPU (``writer shares the CPU``), one with it pinned to
``--writer-cpu`` (``writer on its own CPU``). Beside them, per record: the request path's CPU
(``PredictionLog.offer`` alone), the gateway's writer thread (packing and sending each batch,
under the GIL) and the writer process (JSON, gzip, files).

Over HTTP: wrk (loadtests/wrk.py) against a real ``turnout serve`` process, the same three
settings in alternating runs, server on CPU 1 and wrk on CPU 0 by default (as loadtests/run.py),
the writer process moved to ``--writer-cpu`` for the third; medians.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from gateway.app import create_app
from gateway.background.prediction_records import Batch
from gateway.background.predictions import PredictionLog
from gateway.demo import write_demo_repository
from gateway.serving.registry import Registry
from gateway.settings import Settings
from loadtests import compare_commits
from loadtests.handler_cost import _call, paired_ratio, request_body
from loadtests.harness import ServerProcess, cpu_seconds, free_port, process_tree
from loadtests.wrk import WrkPoint, run_wrk

START, END = "<!-- prediction-log-cost -->", "<!-- /prediction-log-cost -->"


def _writer_cpu(app: Any) -> tuple[float, float]:
    """CPU seconds so far of an app's prediction log: its writer thread, its writer process."""
    predictions = app.state.predictions
    thread, pid = predictions.thread, predictions.sink.pid
    assert thread is not None and thread.ident is not None and pid is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident)), cpu_seconds([pid])


def _pin_writer(pid: int, cpu: int) -> None:
    os.sched_setaffinity(pid, {cpu})


def request_bodies(repo: Path, count: int = 512) -> list[bytes]:
    """Batch-1 bodies of distinct reference rows: logged records that compress as real traffic
    does (the same body every time would make the log's gzip nearly free)."""
    rows = np.load(repo / "fraud" / "1" / "reference.npy")[:count].astype(np.float32)
    return [
        orjson.dumps({"inputs": [{"name": "input", "shape": [1, row.size], "datatype": "FP32",
                                  "data": row.tolist()}]})
        for row in rows
    ]  # fmt: skip


async def _per_request_us(app: Any, bodies: list[bytes], n: int) -> tuple[float, float]:
    """µs per request: wall clock, and the CPU of this thread (the event loop's) alone."""
    start, cpu = time.perf_counter(), time.thread_time()
    count = len(bodies)
    for i in range(n):
        await _call(app, bodies[i % count])
    return (time.perf_counter() - start) / n * 1e6, (time.thread_time() - cpu) / n * 1e6


SHARED, OWN = "log on, writer shares the CPU", "log on, writer on its own CPU"


async def _measure(
    repo: Path, log_dir: Path, rounds: int, n: int, writer_cpu: int
) -> dict[str, Any]:
    body = request_bodies(repo)
    async with contextlib.AsyncExitStack() as stack:
        apps: dict[str, Any] = {}
        for name in ("log off", SHARED, OWN):
            extra: dict[str, Any] = {}
            if name != "log off":
                extra = {"prediction_log_sample": {"fraud": 1.0}}
                extra["prediction_log_dir"] = log_dir / ("own" if name == OWN else "shared")
            app = create_app(Settings(repo, **extra))
            await stack.enter_async_context(app.router.lifespan_context(app))
            while not app.state.endpoints.registry.started:
                await asyncio.sleep(0.05)
            apps[name] = app
        for app in apps.values():
            await _per_request_us(app, body, 500)
        await asyncio.sleep(0.5)  # the writers' first batch: their processes run
        _pin_writer(apps[OWN].state.predictions.sink.pid, writer_cpu)
        results: dict[str, list[float]] = {name: [] for name in apps}
        loop_cpu: dict[str, list[float]] = {name: [] for name in apps}
        order = list(apps)
        before = {name: _writer_cpu(apps[name]) for name in (SHARED, OWN)}
        for i in range(rounds):
            for name in order[i % len(order) :] + order[: i % len(order)]:
                wall, cpu = await _per_request_us(apps[name], body, n)
                results[name].append(wall)
                loop_cpu[name].append(cpu)
        await asyncio.sleep(0.5)  # the writers' last batch
        writer: dict[str, list[float]] = {}
        for name in (SHARED, OWN):
            after = _writer_cpu(apps[name])
            writer[name] = [
                (a - b) / (rounds * n) * 1e6 for a, b in zip(after, before[name], strict=True)
            ]
        offer_us = _offer_us(apps[SHARED].state.endpoints.registry)
        return {"results": results, "loop_cpu": loop_cpu, "writer_us": writer, "offer_us": offer_us}


class _Discard:
    """A sink that keeps nothing (the offer is timed alone)."""

    def write(self, batch: Batch) -> int:
        return 0

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def _offer_us(registry: Registry, n: int = 200_000, period: int = 1000) -> float:
    """µs of one ``offer`` as the request path makes it (sampled, queued), minimum of 5. The
    queue is emptied every ``period`` offers, as the writer does every 0.2 s at 5,000 req/s (a
    queue left to grow to 10⁵ tuples makes each offer pay for the collector walking them)."""
    loaded = registry.latest("fraud")
    row = np.ones((1, 32), np.float32)
    inputs, outputs = {"input": row}, {"probability": np.ones((1, 1), np.float32)}
    figures = []
    for _ in range(5):
        log = PredictionLog({"fraud": 1.0}, _Discard(), max_records=n + 1, max_bytes=1 << 40)
        offer = log.offer
        spent = 0.0
        for _ in range(n // period):
            start = time.perf_counter()
            for _ in range(period):
                offer("id", None, loaded.info, "default", None, None, inputs, outputs, "addr:x")
            spent += time.perf_counter() - start
            log.drain()
        figures.append(spent / n * 1e6)
    return min(figures)


def in_process(rounds: int, n: int, writer_cpu: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        out = uvloop.run(_measure(repo, Path(tmp) / "log", rounds, n, writer_cpu))
        files = (Path(tmp) / "log" / "shared").iterdir()
        out["file_bytes"] = sum(p.stat().st_size for p in files)
    return out


def over_http(
    runs: int,
    duration_s: float,
    connections: int,
    server_cpus: str | None,
    wrk_cpus: str | None,
    writer_cpu: int,
) -> dict[str, list[WrkPoint]]:
    """wrk runs of ``turnout serve``: log off, on, on with the writer process moved to
    ``writer_cpu``; in a rotating order, ``runs`` each."""
    names = ["log off", SHARED, OWN]
    figures: dict[str, list[WrkPoint]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(request_body(repo))
        for i in range(runs):
            for name in names[i % 3 :] + names[: i % 3]:
                port = free_port()
                args = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo)]
                args += ["--port", str(port), "--log-level", "warning"]
                if name != "log off":
                    args += ["--prediction-log-sample", "fraud=1"]
                    args += ["--prediction-log-dir", str(Path(tmp) / f"log{i}")]
                server = ServerProcess(
                    name.split(",")[0].replace(" ", "-"), args, port, Path(tmp), cpus=server_cpus
                )
                server.start()
                try:
                    server.wait_ready()
                    url = f"{server.url}/v2/models/fraud/infer"
                    run_wrk(url, body_path, connections=connections, duration_s=2, cpus=wrk_cpus)
                    if name == OWN:
                        root = server.pids()[0]
                        for pid in process_tree(root)[1:]:  # the writer process
                            _pin_writer(pid, writer_cpu)
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
    lines = [
        START,
        "## Prediction log at 100 % sampling (`fraud`, batch 1)",
        "",
        f"`python -m loadtests.prediction_log_cost --rounds {args.rounds} -n {args.n} "
        f"--http-runs {args.http_runs}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}). In process: three apps "
        "in one process pinned to one CPU, paired rounds in a rotating order; every request of "
        "`log on` is recorded to a gzip JSONL directory by the writer process, which runs on "
        f"that CPU or on CPU {args.writer_cpu}.",
        "",
        "| in process | µs/request (median) | throughput ÷ log off (median of paired rounds) "
        "| event loop thread CPU µs/request | writer thread CPU µs/record (GIL) "
        "| writer process CPU µs/record | GIL-bound CPU ÷ log off |",
        "|---|---|---|---|---|---|---|",
    ]
    loop_off = statistics.median(inproc["loop_cpu"]["log off"])
    lines.append(
        f"| log off | {statistics.median(results['log off']):.1f} | 1.000 | {loop_off:.1f} "
        "| | | 1.000 |"
    )
    for name in (SHARED, OWN):
        thread_us, process_us = inproc["writer_us"][name]
        loop_on = statistics.median(inproc["loop_cpu"][name])
        lines.append(
            f"| {name} | {statistics.median(results[name]):.1f} "
            f"| {paired_ratio(results, name, 'log off'):.3f} | {loop_on:.1f} | {thread_us:.2f} "
            f"| {process_us:.2f} | {(loop_on + thread_us) / loop_off:.3f} |"
        )
    lines += [
        "",
        f"Request path (`offer`, timed alone): {inproc['offer_us']:.2f} µs a record; "
        f"{inproc['file_bytes'] / (args.rounds * args.n):.0f} bytes per record on disk.",
    ]
    if http["log off"]:
        rps = {k: [p.rps for p in v] for k, v in http.items()}
        cpu = {k: [p.server_cpu_us_per_request for p in v] for k, v in http.items()}
        other = statistics.median(p.other_cpu for v in http.values() for p in v)

        def each(values: list[float]) -> str:
            return ", ".join(f"{x:.0f}" for x in values)

        r_off, c_off = statistics.median(rps["log off"]), statistics.median(cpu["log off"])
        lines += [
            "",
            f"Over HTTP: `turnout serve` on CPUs {args.server_cpus or 'any'}, wrk on CPUs "
            f"{args.wrk_cpus or 'any'} ({args.connections} connections, "
            f"{args.duration:.0f} s runs, {args.http_runs} runs each, rotating; one body, "
            "so the records compress better than real traffic's). Server CPU: its process tree, "
            f"writer process included. Other tenants took a median {other:.2f} of a CPU.",
            "",
            "| HTTP | req/s (median) | runs | ÷ log off | server CPU µs/request (median) | runs |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("log off", SHARED, OWN):
            r, c = statistics.median(rps[name]), statistics.median(cpu[name])
            lines.append(
                f"| {name} | {r:.0f} | {each(rps[name])} | {r / r_off:.3f} | {c:.0f} "
                f"| {each(cpu[name])} |"
            )
        lines.append(
            f"\nCPU per request, log on ÷ off: {statistics.median(cpu[SHARED]) / c_off:.3f}."
        )
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
    p.add_argument("--writer-cpu", type=int, default=0, help="the writer process's own CPU")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    inproc = in_process(args.rounds, args.n, args.writer_cpu)
    http: dict[str, list[WrkPoint]] = {"log off": []}
    if args.http_runs:
        cpus = (args.server_cpus or None, args.wrk_cpus or None)
        http = over_http(args.http_runs, args.duration, args.connections, *cpus, args.writer_cpu)
    text = section(inproc, http, args)
    print(text)
    if args.write:
        compare_commits.write(text, START, END)
        print(f"wrote {compare_commits.BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
