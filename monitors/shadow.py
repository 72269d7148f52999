"""Shadow divergence: how far a shadow version's outputs are from the primary's.

Per request, over every output both versions returned with the same shape (outputs that are
strings or empty are skipped):
- mean absolute difference over all elements (as float64);
- disagreement of the decision each row implies: the arg-max over the last axis when it has
  more than one column, else the 0.5 threshold of a single score; integer and boolean outputs
  (labels) disagree where they differ.

``add_merged`` takes many requests at once (one shadow run over their concatenated inputs) and
gives exactly the totals ``add`` would give request by request, the float sum included: each
request's sum is the same numpy reduction over the same values, added in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class Divergence:
    """Additive totals for one (model, primary version, shadow version)."""

    requests: int = 0  # compared
    errors: int = 0
    dropped: int = 0  # not run: too many shadow copies in flight
    inflight: int = 0  # accepted, not yet compared (waiting or running)
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
            if s is not None and _comparable(p, s.shape, s):
                self.abs_diff_sum += self._compare(p, s)

    def add_merged(
        self,
        primaries: Sequence[Mapping[str, np.ndarray]],
        shadow: Mapping[str, np.ndarray],
        rows: Sequence[int],
    ) -> None:
        """As ``add(primaries[i], shadow_i)`` for each i in turn, where ``shadow_i`` holds
        ``rows[i]`` consecutive rows (first axis) of every array in ``shadow``: the outputs of
        one run over the requests' inputs concatenated in order. Raises ValueError when an
        output in ``shadow`` does not have ``sum(rows)`` rows."""
        bounds = list(itertools.accumulate(rows, initial=0))
        total = bounds[-1]
        if any(s.ndim == 0 or s.shape[0] != total for s in shadow.values()):
            raise ValueError(f"shadow outputs must have {total} rows")
        # per output name, each request's absolute difference sum (None: skipped)
        sums: dict[str, list[float | None]] = {}
        for name in dict.fromkeys(itertools.chain.from_iterable(primaries)):
            s = shadow.get(name)
            if s is None:
                continue
            parts = [p.get(name) for p in primaries]
            shapes = {r: (r, *s.shape[1:]) for r in set(rows)}
            dtype = parts[0].dtype if parts[0] is not None else None
            if (
                dtype is not None
                and _comparable_kind(dtype, s)
                and 0 not in shapes
                and all(
                    x is not None and x.dtype == dtype and x.shape == shapes[r]
                    for x, r in zip(parts, rows, strict=True)
                )
            ):  # every request compares this output (so none is empty), in one dtype
                sums[name] = self._compare_merged([x for x in parts if x is not None], s, rows)
            else:  # one at a time
                sums[name] = [
                    self._compare(x, s[lo:hi])
                    if x is not None and _comparable(x, shapes[r], s)
                    else None
                    for x, r, (lo, hi) in zip(parts, rows, itertools.pairwise(bounds), strict=True)
                ]
        self.requests += len(primaries)
        # request by request, output by output: the order ``add`` sums in
        for i, p in enumerate(primaries):
            for name in p:
                value = sums[name][i] if name in sums else None
                if value is not None:
                    self.abs_diff_sum += value

    def _compare(self, p: np.ndarray, s: np.ndarray) -> float:
        """Count one request's output (equal shapes) and return its absolute difference sum."""
        a = p.astype(np.float64, copy=False)
        b = s.astype(np.float64, copy=False)
        self.elements += a.size
        rows = a.shape[0] if a.ndim > 1 else a.size
        self.rows += rows
        self.disagreements += int(np.count_nonzero(_decision(p, rows) != _decision(s, rows)))
        return float(np.abs(a - b).sum())

    def _compare_merged(
        self, primaries: list[np.ndarray], s: np.ndarray, rows: Sequence[int]
    ) -> list[float | None]:
        """``_compare`` for requests whose outputs all have shape (rows[i], *s.shape[1:]) and
        one dtype: one pass over their concatenation; each request's sum is reduced alone."""
        p = primaries[0] if len(primaries) == 1 else np.concatenate(primaries)
        a = p.astype(np.float64, copy=False)
        b = s.astype(np.float64, copy=False)
        self.elements += a.size
        self.rows += s.shape[0]  # one row per element when 1-D, else per first-axis index
        self.disagreements += int(
            np.count_nonzero(_decision(p, s.shape[0]) != _decision(s, s.shape[0]))
        )
        diff = np.abs(a - b)
        if len(set(rows)) == 1:
            # a reduction along a contiguous last axis is the one a request's own sum makes
            sums: list[float | None] = diff.reshape(len(rows), -1).sum(axis=1).tolist()
            return sums
        bounds = list(itertools.accumulate(rows, initial=0))
        return [float(diff[lo:hi].sum()) for lo, hi in itertools.pairwise(bounds)]


def _comparable(p: np.ndarray, shape: tuple[int, ...], s: np.ndarray) -> bool:
    """Whether a request's output ``p`` is compared with the shadow's, of ``shape``."""
    return p.shape == shape and p.size > 0 and _comparable_kind(p.dtype, s)


def _comparable_kind(dtype: np.dtype[Any], s: np.ndarray) -> bool:
    return dtype.kind != "O" and s.dtype.kind != "O" and s.size > 0


def _decision(x: np.ndarray, rows: int) -> np.ndarray:
    flat = x.reshape(rows, -1)
    if flat.shape[1] > 1:
        return np.asarray(flat.argmax(axis=1))
    column: np.ndarray = flat[:, 0]
    return column >= 0.5 if x.dtype.kind == "f" else column  # kind: np.issubdtype costs 1 µs
