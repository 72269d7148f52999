"""Cost of the quality accumulators after warm_up: µs per call (best of 5 rounds).

- ``observe_unlabelled`` of one score (the hot-path case, once per request), float32 and a
  (1, 1) float64 output;
- ``observe`` of 10,000 labelled pairs (a batch of outcomes), float64 scores and int64 labels;
- ``realized``, ``estimated``, ``to_bytes``/``from_bytes`` and ``merge`` of a busy accumulator.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import numpy as np

from monitors import BinaryQuality, warm_up


def best(call: Callable[[], object], number: int) -> float:
    """Seconds per call, the best of 5 rounds."""
    return min(timeit.repeat(call, number=number, repeat=5)) / number


def main() -> None:
    warm_up()
    rng = np.random.default_rng(0)
    quality = BinaryQuality()
    for _ in range(100):  # a busy accumulator: a million pairs and served scores
        scores = rng.random(10_000)
        quality.observe(scores, rng.random(10_000) < scores)
        quality.observe_unlabelled(scores)
    one32, one64 = np.array([0.3], np.float32), np.array([[0.3]])
    scores = rng.random(10_000)
    labels = (rng.random(10_000) < scores).astype(np.int64)
    raw = quality.to_bytes()
    other = BinaryQuality.from_bytes(raw)
    served = quality.observe_unlabelled
    rows = [
        ("observe_unlabelled, 1 float32 score", best(lambda: served(one32), 100_000)),
        ("observe_unlabelled, (1, 1) float64", best(lambda: served(one64), 100_000)),
        ("observe, 10,000 labelled pairs", best(lambda: quality.observe(scores, labels), 200)),
        ("realized()", best(quality.realized, 200)),
        ("estimated()", best(quality.estimated, 200)),
        (f"to_bytes() ({len(raw):,} bytes)", best(quality.to_bytes, 100)),
        ("from_bytes()", best(lambda: BinaryQuality.from_bytes(raw), 100)),
        ("merge()", best(lambda: other.merge(quality), 100)),
    ]  # fmt: skip
    for name, seconds in rows:
        print(f"{name:40s} {seconds * 1e6:9.2f} µs")


if __name__ == "__main__":
    main()
