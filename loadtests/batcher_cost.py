"""Cost of ``BatchingRuntime.run`` itself, around a model that takes no time (its outputs made
once): what the batcher's bookkeeping (counters, the statistics extension's timings) adds to a
request, without the session, the codec or the network. Two paths, both on the event loop:

- ``inline``: a light request that finds the runtime idle runs at once (the request path of
  ``loadtests.handler_cost``);
- ``merged``: requests that arrive while the loop is busy, merged in groups of ``--group`` and run
  on the loop (queue, merge, slice, deliver).

Best of ``--repeats`` rounds, in µs of this thread's CPU time per request (``time.thread_time``:
what the loop thread spends, not the time it waited for a CPU the machine's other jobs held; both
paths run on the loop thread only); pin it to one CPU (``taskset -c 1``). To compare
two commits, run this file with ``PYTHONPATH`` at each checkout:
``PYTHONPATH=/path/to/old python loadtests/batcher_cost.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gateway.serving.batcher import BatchConfig, BatchingRuntime
from gateway.serving.types import TensorSpec


class Instant:
    """A model that answers at once: the outputs for any rows, precomputed."""

    def __init__(self) -> None:
        self.out = np.zeros((1 << 10, 1), dtype=np.float32)

    def run_sync(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        return {"y": self.out[: next(iter(inputs.values())).shape[0]]}

    def close(self) -> None:
        pass


def runtime(executor: ThreadPoolExecutor, busy: bool) -> BatchingRuntime:
    spec = TensorSpec("x", "FP32", (-1, 8))
    return BatchingRuntime(
        Instant(),
        [spec],
        executor,
        BatchConfig(max_batch_size=64),
        name="instant",
        inline_rows=1 << 10,
        busy=(lambda: True) if busy else (lambda: False),
    )


async def inline_round(rt: BatchingRuntime, x: dict[str, np.ndarray], n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        await rt.run(x, ["y"])
    return time.thread_time() - start


async def merged_round(rt: BatchingRuntime, x: dict[str, np.ndarray], n: int, group: int) -> float:
    start = time.thread_time()
    for _ in range(n // group):
        await asyncio.gather(*(rt.run(x, ["y"]) for _ in range(group)))
    return time.thread_time() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000, help="requests per round")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--group", type=int, default=8)
    args = parser.parse_args(argv)
    x = {"x": np.zeros((1, 8), dtype=np.float32)}
    with ThreadPoolExecutor(1) as executor:

        async def measure() -> tuple[float, float]:
            alone, merged = runtime(executor, busy=False), runtime(executor, busy=True)
            inline = [await inline_round(alone, x, args.n) for _ in range(args.repeats)]
            group = args.group
            rounds = [await merged_round(merged, x, args.n, group) for _ in range(args.repeats)]
            return min(inline) / args.n * 1e6, min(rounds) / args.n * 1e6

        inline_us, merged_us = asyncio.run(measure())
    print(f"inline   {inline_us:6.3f} µs/request (best of {args.repeats} x {args.n})")
    print(f"merged   {merged_us:6.3f} µs/request (groups of {args.group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
