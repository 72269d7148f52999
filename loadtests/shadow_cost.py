"""Event-loop time per shadow copy: the batched ShadowRunner against the design it replaced (one
task per copy, run and compared alone; kept below as ``PerCopy`` with the ``Divergence.add`` of
that time).

Demo fraud model, v1 primary and v2 shadow, batch-1 requests of 32 FP32 features, loaded as the
gateway loads them (the inline threshold puts v2's runs on the event loop). A round submits
``k`` copies in one step, as ``k`` responses finishing together would, and lets the loop run
them once (the batched runner without its delay: ``k`` copies per drain); the same driver with a
runner that does nothing is subtracted. In the gateway, a drain takes the copies of ``delay_s``
(5 ms: ``k`` ≈ 12 at 2,312 req/s) or of ``SOON``, whichever comes first. Prints CPU µs of the
loop's thread per copy (median over rounds) for several ``k``, and the parts of one copy.

Run: ``.venv/bin/python -m loadtests.shadow_cost [--rounds 7] [-n 20000]``; pin it to one CPU
(``taskset -c 1``) on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import uvloop

from gateway.background.shadow import ShadowRunner
from gateway.demo import sample_inputs, write_demo_repository
from gateway.errors import GatewayError
from gateway.serving.batcher import BatchConfig, BatchingRuntime
from gateway.serving.registry import Registry
from gateway.serving.runtime import inline_rows, load_version
from gateway.serving.types import ModelVersion, Runtime
from gateway.settings import Settings
from monitors import VersionMonitor
from monitors.shadow import Divergence

Arrays = Mapping[str, np.ndarray]
BATCHES = (1, 4, 16, 64)  # copies submitted in one step (64: the default in-flight limit)
LIMIT = 1 << 20  # not measured here: never reached


class Runner(Protocol):
    divergence: dict[tuple[str, str, str], Divergence]

    def submit(
        self, model: str, primary: str, shadows: Sequence[str], inputs: Arrays, outputs: Arrays
    ) -> None: ...


def add_as_before(d: Divergence, primary: Arrays, shadow: Arrays) -> None:
    """``Divergence.add`` as it was with that design (np.issubdtype in the decision)."""
    d.requests += 1
    for name, p in primary.items():
        s = shadow.get(name)
        if s is None or s.shape != p.shape or p.dtype == object or p.size == 0:
            continue
        a = p.astype(np.float64, copy=False)
        b = s.astype(np.float64, copy=False)
        d.elements += a.size
        d.abs_diff_sum += float(np.abs(a - b).sum())
        rows = a.shape[0] if a.ndim > 1 else a.size
        d.rows += rows
        d.disagreements += int(np.count_nonzero(decision(p, rows) != decision(s, rows)))


def decision(x: np.ndarray, rows: int) -> np.ndarray:
    flat = x.reshape(rows, -1)
    if flat.shape[1] > 1:
        return np.asarray(flat.argmax(axis=1))
    column: np.ndarray = flat[:, 0]
    return column >= 0.5 if np.issubdtype(x.dtype, np.floating) else column


class PerCopy:
    """The previous design's path for a light copy: a task per copy, run and compared alone."""

    def __init__(self, registry: Registry, limit: int, executor: ThreadPoolExecutor) -> None:
        self.registry = registry
        self.limit = limit
        self.divergence: dict[tuple[str, str, str], Divergence] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor = executor

    def submit(
        self, model: str, primary: str, shadows: Sequence[str], inputs: Arrays, outputs: Arrays
    ) -> None:
        for version in shadows:
            d = self.divergence.setdefault((model, primary, version), Divergence())
            if len(self._tasks) >= self.limit:
                d.dropped += 1
                continue
            d.inflight += 1
            task = asyncio.create_task(self._run(d, model, version, inputs, outputs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self, d: Divergence, model: str, version: str, inputs: Arrays, outputs: Arrays
    ) -> None:
        try:
            with self.registry.get(model, version) as loaded:
                runtime = loaded.runtime
                if isinstance(runtime, BatchingRuntime) and runtime.cheap(inputs):
                    result = runtime.run_sync(inputs, list(outputs))
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(
                        self._executor, runtime.run_sync, inputs, list(outputs)
                    )
        except GatewayError:
            d.errors += 1
            return
        finally:
            d.inflight -= 1
        add_as_before(d, outputs, result)


class Null:
    """The driver's own cost: accepts copies and does nothing."""

    def __init__(self) -> None:
        self.divergence: dict[tuple[str, str, str], Divergence] = {}

    def submit(
        self, model: str, primary: str, shadows: Sequence[str], inputs: Arrays, outputs: Arrays
    ) -> None:
        pass


def load(repo: Path, executor: ThreadPoolExecutor) -> Registry:
    settings = Settings(repo)

    def loader(
        model: str, version: str, folder: Path
    ) -> tuple[ModelVersion, Runtime, VersionMonitor]:
        info, session = load_version(model, version, folder, settings, executor)
        runtime = BatchingRuntime(
            session,
            info.inputs,
            executor,
            BatchConfig(),
            name=f"{model} v{version}",
            inline_rows=inline_rows(session.cost, settings.inline_threshold_us / 1e6),
        )
        return info, runtime, VersionMonitor.fit(None, {})

    return Registry(repo, loader)


async def per_copy_us(
    runner: Runner, requests: list[tuple[Arrays, Arrays]], k: int, n: int
) -> float:
    """CPU time of the loop's thread per copy, ``n`` copies submitted ``k`` per step, each step
    followed by one turn of the loop (the copies' runs are inline, so one turn settles them)."""
    gc.collect()
    start = time.thread_time()
    i = 0
    for _ in range(n // k):
        for _ in range(k):
            inputs, outputs = requests[i % len(requests)]
            runner.submit("fraud", "1", ("2",), inputs, outputs)
            i += 1
        await asyncio.sleep(0)
    elapsed = time.thread_time() - start
    d = runner.divergence.get(("fraud", "1", "2"))
    if d is not None and (d.inflight or d.errors or d.dropped):
        raise RuntimeError(f"copies not settled in one turn: {d}")
    return elapsed / i * 1e6


async def measure(repo: Path, rounds: int, n: int) -> dict[tuple[str, int], list[float]]:
    executor = ThreadPoolExecutor(2)
    registry = load(repo, executor)
    await registry.load("fraud")
    primary = registry.get("fraud", "1").runtime
    rows = sample_inputs("fraud", 1024, seed=0)["input"]
    requests: list[tuple[Arrays, Arrays]] = []
    for j in range(len(rows)):
        inputs = {"input": rows[j : j + 1].copy()}
        requests.append((inputs, primary.run_sync(inputs, ["probability"])))
    results: dict[tuple[str, int], list[float]] = {}
    batched = ShadowRunner(registry, LIMIT, delay_s=0.0)  # k copies per drain, no more
    designs: dict[str, Runner] = {
        "null": Null(),
        "per copy": PerCopy(registry, LIMIT, executor),
        "batched": batched,
    }
    for k in BATCHES:
        for runner in designs.values():  # warm every path
            await per_copy_us(runner, requests, k, 1000)
        for r in range(rounds):  # alternate the order: what runs first in a round pays more
            order = list(designs) if r % 2 == 0 else list(designs)[::-1]
            for name in order:
                value = await per_copy_us(designs[name], requests, k, n)
                results.setdefault((name, k), []).append(value)
    await batched.close()
    await registry.close()
    executor.shutdown()
    return results


def parts(repo: Path, executor: ThreadPoolExecutor) -> tuple[float, float, float]:
    """CPU µs of one 1-row ``run_sync`` of v2, of one ``Divergence.add`` and of the same as it
    was, best of 5."""

    async def setup() -> tuple[Runtime, Arrays, Arrays]:
        registry = load(repo, executor)
        await registry.load("fraud")
        inputs = {"input": sample_inputs("fraud", 1, seed=1)["input"]}
        out = registry.get("fraud", "1").runtime.run_sync(inputs, ["probability"])
        return registry.get("fraud", "2").runtime, inputs, out

    shadow, inputs, primary = asyncio.run(setup())
    result = shadow.run_sync(inputs, ["probability"])
    d = Divergence()
    number = 20_000

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=number, timer=time.thread_time)) / number * 1e6

    return (
        best(lambda: shadow.run_sync(inputs, ["probability"])),
        best(lambda: d.add(primary, result)),
        best(lambda: add_as_before(d, primary, result)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.shadow_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("-n", type=int, default=20_000, help="copies per design per round")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        results = uvloop.run(measure(repo, a.rounds, a.n))
        with ThreadPoolExecutor(1) as executor:
            run_us, add_us, before_us = parts(repo, executor)
    print(
        f"CPU µs of the loop's thread per shadow copy, median of {a.rounds} rounds, driver removed"
    )
    print(f"{'copies per turn':>15} {'per copy':>9} {'batched':>9} {'ratio':>6}")
    for k in BATCHES:
        base = statistics.median(results[("null", k)])
        old = statistics.median(results[("per copy", k)]) - base
        new = statistics.median(results[("batched", k)]) - base
        print(f"{k:>15} {old:>9.2f} {new:>9.2f} {old / new:>6.1f}")
    print(
        f"one copy's parts: run_sync (1 row) {run_us:.2f} µs, Divergence.add {add_us:.2f} µs"
        f" ({before_us:.2f} µs before)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
