"""Shadow divergence: how far a shadow version's outputs are from the primary's.

Per request, over every output both versions returned with the same shape:
- mean absolute difference over all elements (as float64);
- disagreement of the decision each row implies: the arg-max over the last axis when it has
  more than one column, else the 0.5 threshold of a single score; integer and boolean outputs
  (labels) disagree where they differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Divergence:
    """Additive totals for one (model, primary version, shadow version)."""

    requests: int = 0  # compared
    errors: int = 0
    dropped: int = 0  # not run: too many shadow copies in flight
    inflight: int = 0
    rows: int = 0
    disagreements: int = 0
    elements: int = 0
    abs_diff_sum: float = 0.0

    def as_json(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "dropped": self.dropped,
            "inflight": self.inflight,
            "mean_abs_diff": self.mean_abs_diff,
            "disagreement_rate": self.disagreement_rate,
        }

    @property
    def mean_abs_diff(self) -> float | None:
        return self.abs_diff_sum / self.elements if self.elements else None

    @property
    def disagreement_rate(self) -> float | None:
        return self.disagreements / self.rows if self.rows else None

    def add(self, primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> None:
        self.requests += 1
        for name, p in primary.items():
            s = shadow.get(name)
            if s is None or s.shape != p.shape or p.dtype == object or p.size == 0:
                continue
            a = p.astype(np.float64, copy=False)
            b = s.astype(np.float64, copy=False)
            self.elements += a.size
            self.abs_diff_sum += float(np.abs(a - b).sum())
            rows = a.shape[0] if a.ndim > 1 else a.size
            self.rows += rows
            self.disagreements += int(np.count_nonzero(_decision(p, rows) != _decision(s, rows)))


def _decision(x: np.ndarray, rows: int) -> np.ndarray:
    flat = x.reshape(rows, -1)
    if flat.shape[1] > 1:
        return np.asarray(flat.argmax(axis=1))
    column: np.ndarray = flat[:, 0]
    return column >= 0.5 if np.issubdtype(x.dtype, np.floating) else column
