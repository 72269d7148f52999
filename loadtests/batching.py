"""Dynamic batching vs. one session run per request, in process (no HTTP).

Run: ``.venv/bin/python loadtests/batching.py``. ``callers`` coroutines each send one-row
requests to the ``heavy`` demo model back to back for ``SECONDS``; the figure is completed
requests per second of the median of ``REPEATS`` runs (by rate), with that run's median
request latency and mean rows per batch.
Both sides use the gateway's defaults: one intra-op thread per session and an executor of
``execution_threads`` threads.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.demo import sample_inputs, write_demo_repository
from gateway.serving.batcher import BatchConfig, BatchingRuntime
from gateway.serving.runtime import load_version
from gateway.serving.types import ModelVersion, Runtime
from gateway.settings import Settings

SECONDS = 2.0
REPEATS = 3
CALLERS = (1, 8, 64)
ROWS = 1024  # distinct single-row inputs, cycled


async def drive(runtime: Runtime, callers: int) -> tuple[float, float]:
    """(requests/s, median latency in ms) for ``callers`` concurrent closed-loop callers."""
    rows = sample_inputs("heavy", ROWS, seed=5)["input"]
    latencies: list[float] = []
    stop = time.perf_counter() + SECONDS

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await runtime.run({"input": rows[i % ROWS : i % ROWS + 1]}, ["output"])
            latencies.append(time.perf_counter() - start)
            i += callers

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies) * 1e3


def once(make: Callable[[], Runtime], callers: int) -> tuple[float, float, float]:
    """(requests/s, median latency ms, mean rows per batch) of one run on a fresh runtime."""
    runtime = make()
    rate, latency = asyncio.run(drive(runtime, callers))
    stats = runtime.stats if isinstance(runtime, BatchingRuntime) else None
    per_batch = stats.rows / stats.batches if stats is not None and stats.batches else 1.0
    return rate, latency, per_batch


def main() -> None:
    settings = Settings(Path(tempfile.mkdtemp(prefix="turnout-batching-")))
    write_demo_repository(settings.model_repository, heavy=True)
    folder = settings.model_repository / "heavy" / "1"
    with ThreadPoolExecutor(settings.execution_threads) as executor:
        info, session = load_version("heavy", "1", folder, settings, executor)

        def batched(concurrent: int) -> Callable[[], Runtime]:
            config = BatchConfig(max_concurrent_batches=concurrent)
            return lambda: BatchingRuntime(session, info.inputs, executor, config, name="heavy")

        cases: list[tuple[str, Callable[[], Runtime]]] = [
            ("SessionRuntime", lambda: session),  # one session run per request, as today
            ("BatchingRuntime", batched(1)),
            ("BatchingRuntime x2", batched(2)),
        ]
        _describe(info, settings)
        # Repeats interleave the cases so drift in machine load spreads over all of them.
        runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(REPEATS):
            for name, make in cases:
                for callers in CALLERS:
                    runs.setdefault((name, callers), []).append(once(make, callers))
        print(f"{'runtime':<20} {'callers':>7} {'req/s':>8} {'p50 ms':>8} {'rows/batch':>10}")
        for (name, callers), results in runs.items():
            rate, latency, per_batch = sorted(results)[len(results) // 2]  # the median run
            print(f"{name:<20} {callers:>7} {rate:>8.0f} {latency:>8.1f} {per_batch:>10.1f}")


def _describe(info: ModelVersion, settings: Settings) -> None:
    print(
        f"model {info.model} v{info.version}: {SECONDS:.0f} s per run, median of {REPEATS}; "
        f"intra_op_threads={settings.intra_op_threads}, "
        f"execution_threads={settings.execution_threads}; 'x2' = max_concurrent_batches=2"
    )


if __name__ == "__main__":
    main()
