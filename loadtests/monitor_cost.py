"""Cost of VersionMonitor.observe on the hot path, after warm_up: µs per call, 32 features and
two outputs (a label and two probabilities), the clock advancing 0.1 ms per call."""

from __future__ import annotations

import itertools
import timeit

import numpy as np

from monitors import VersionMonitor, warm_up

N_FEATURES = 32
CALLS = 100_000


def outputs_for(features: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "label": (features[:, 0] > 0).astype(np.int64),
        "probabilities": rng.random((features.shape[0], 2)).astype(np.float32),
    }


def main() -> None:
    warm_up()
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5_000, N_FEATURES)).astype(np.float32)
    monitor = VersionMonitor.fit(reference, outputs_for(reference, rng))
    ticks = itertools.count()
    for batch in (1, 64):
        features = rng.normal(size=(batch, N_FEATURES)).astype(np.float32)
        outputs = outputs_for(features, rng)

        def call(features: np.ndarray = features, outputs: dict[str, np.ndarray] = outputs) -> None:
            monitor.observe(features, outputs, 2e-3, 1e-3, next(ticks) * 1e-4)

        best = min(timeit.repeat(call, number=CALLS, repeat=5)) / CALLS
        print(
            f"batch {batch:3d}, {N_FEATURES} features, 2 outputs: {best * 1e6:.2f} µs per observe"
        )


if __name__ == "__main__":
    main()
