"""The compute floor: onnxruntime ``session.run`` in-process, per call at batch 1 and per sample
at the best batch size, with the options the bare handler and the gateway use."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from loadtests.bare import session_options

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class Floor:
    """µs per ``session.run`` call at batch 1, and µs per sample for each batch size tried."""

    model: str
    batch1_us: float
    per_sample_us: tuple[tuple[int, float], ...]

    @property
    def best(self) -> tuple[int, float]:
        """(batch size, µs per sample) with the least time per sample."""
        return min(self.per_sample_us, key=lambda bs: bs[1])


@contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Pin the calling thread (and threads it starts) to ``cpus`` for the block."""
    if not cpus:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def time_call(session: Any, feeds: dict[str, np.ndarray], budget_s: float, repeats: int) -> float:
    """The least, over ``repeats``, of the mean seconds per call, each repeat lasting
    ≈ ``budget_s``: on a shared machine noise only ever adds time, so the minimum is the floor."""
    for _ in range(3):
        session.run(None, feeds)
    started = time.perf_counter()
    session.run(None, feeds)
    once = max(time.perf_counter() - started, 1e-7)
    calls = max(1, int(budget_s / once))
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            session.run(None, feeds)
        means.append((time.perf_counter() - started) / calls)
    return min(means)


def measure(
    model: str,
    path: Path,
    rows: np.ndarray,
    *,
    batches: Sequence[int] = BATCHES,
    budget_s: float = 0.1,
    repeats: int = 5,
) -> Floor:
    """``rows`` (n, features) are tiled or cut to each batch size and fed to the first input."""
    session = ort.InferenceSession(
        str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    per_sample = []
    batch1 = float("nan")
    for batch in batches:
        x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])), dtype=np.float32)
        seconds = time_call(session, {name: x}, budget_s, repeats)
        if batch == 1:
            batch1 = seconds * 1e6
        per_sample.append((batch, seconds * 1e6 / batch))
    return Floor(model, batch1, tuple(per_sample))
