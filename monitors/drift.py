"""Drift: the one definition, used by the gateway and offline alike (``psi``).

Reference fit, once per version at load, from the reference sample's finite values (NaN and ±inf
are counted apart, never binned):

- A column with at most 20 distinct reference values (integer codes, categories) is categorical:
  one bin per reference value plus one "unseen" bin. Values match by exact float64 equality, so
  a float32 value matches only a category exactly representable in float32 (codes are).
- Otherwise it is numeric: the edges are the reference quantiles at k/10, k = 1..9, with numpy's
  ``method="inverted_cdf"`` (so every edge is an observed value); duplicate edges are merged and
  edges equal to the reference minimum dropped, so no reference bin is empty. Bins are
  left-closed, right-open and the two outer bins open-ended: ``searchsorted(edges, v,
  side="right")``. When at least 90 % of the reference sits on its minimum no edge is left:
  one bin, PSI 0.

PSI = Σᵢ (aᵢ − eᵢ)·ln(aᵢ/eᵢ), eᵢ = (rᵢ + ½)/(N + ½B), aᵢ = (cᵢ + ½)/(M + ½B), with reference
counts r (N in all), current counts c (M in all, finite values only) and B bins; the half count
on both sides replaces any epsilon.

Per column, besides PSI: ``out_of_range``, the fraction of current values below the reference
minimum or above its maximum, and ``missing``, the fraction that are NaN or ±inf; both over all
current values, finite or not (0.0 when there are none).

Status: ``insufficient`` while M < 1000 (or the reference has no finite value); otherwise ``act``
when PSI ≥ max(0.25, crit), ``watch`` when PSI ≥ max(0.1, crit), else ``stable``, where
crit = χ²₀.₉₉(B − 1)·(1/N + 1/M) is the PSI that sampling noise alone reaches 1 % of the time.
``p_value`` = P(χ²(B − 1) ≥ PSI/(1/N + 1/M)); 1.0 when B = 1 or either sample is empty.

Prediction drift is the same over each output column, against the outputs the model computed
on the reference sample at load.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from monitors import kernels
from monitors.kernels import CATEGORICAL, EDGES, HI, LO, MISSING, N_EDGES, OUT_OF_RANGE, WIDTH

Status = Literal["insufficient", "stable", "watch", "act"]

MAX_CATEGORIES = 20
DECILES = np.arange(1, 10) / 10
MIN_CURRENT = 1000
WATCH_PSI = 0.1
ACT_PSI = 0.25
NOISE_LEVEL = 0.01


def fit_column(values: np.ndarray) -> tuple[bool, np.ndarray]:
    """(categorical, edges or sorted category values) of one reference column, as defined above."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    distinct = np.unique(finite)
    if distinct.size <= MAX_CATEGORIES:
        return True, distinct
    edges = np.unique(np.quantile(finite, DECILES, method="inverted_cdf"))
    return False, edges[edges > distinct[0]]


@dataclass(frozen=True, slots=True, eq=False)
class BinProfile:
    """The reference fit of a set of columns: the kernels' profile table and reference counts."""

    names: tuple[str, ...]
    table: np.ndarray  # (n_columns, kernels.PROFILE_WIDTH) float64
    reference: np.ndarray  # (n_columns, kernels.WIDTH) int64

    @classmethod
    def fit(cls, values: np.ndarray, names: Sequence[str]) -> BinProfile:
        """Fit every column of ``values`` (rows, columns), any real dtype; bin the reference
        with the same kernel the live path uses."""
        if values.dtype.kind not in "biuf":
            raise ValueError(f"reference must be numeric, got dtype {values.dtype}")
        if values.ndim != 2 or values.shape[1] != len(names):
            raise ValueError(
                f"reference must be 2-D with {len(names)} columns, got shape {values.shape}"
            )
        table = np.zeros((len(names), kernels.PROFILE_WIDTH), np.float64)
        for j in range(values.shape[1]):
            categorical, edges = fit_column(values[:, j])
            column = np.asarray(values[:, j], dtype=np.float64)
            finite = column[np.isfinite(column)]
            table[j, LO] = finite.min() if finite.size else math.nan
            table[j, HI] = finite.max() if finite.size else math.nan
            table[j, N_EDGES] = edges.size
            table[j, CATEGORICAL] = float(categorical)
            table[j, EDGES : EDGES + edges.size] = edges
        counts = np.zeros((1, len(names), WIDTH), np.int64)
        # numba reads no float16; float32 holds every float16 value exactly.
        wide = np.float32 if values.dtype == np.float16 else None
        kernels.observe_columns(counts, 0, np.ascontiguousarray(values, dtype=wide), table)
        return cls(tuple(names), table, counts[0])

    @property
    def n_columns(self) -> int:
        return len(self.names)

    def n_bins(self, column: int) -> int:
        return int(self.table[column, N_EDGES]) + 1

    def categorical(self, column: int) -> bool:
        return bool(self.table[column, CATEGORICAL])

    def edges(self, column: int) -> np.ndarray:
        """Numeric edges, or the category values (the last bin being "unseen")."""
        return self.table[column, EDGES : EDGES + self.n_bins(column) - 1].copy()


@dataclass(frozen=True, slots=True)
class ColumnDrift:
    """Drift of one column: current counts (n_bins,) against the profile's reference."""

    index: int
    name: str
    categorical: bool
    psi: float
    p_value: float
    critical_psi: float
    status: Status
    out_of_range: float
    missing: float
    count: int
    reference_count: int
    edges: tuple[float, ...]
    reference: tuple[float, ...]
    current: tuple[float, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": "categorical" if self.categorical else "numeric",
            "psi": self.psi,
            "status": self.status,
            "p_value": self.p_value,
            "critical_psi": self.critical_psi if math.isfinite(self.critical_psi) else None,
            "out_of_range": self.out_of_range,
            "missing": self.missing,
            "edges": [] if self.categorical else list(self.edges),
            "categories": list(self.edges) if self.categorical else [],
            "reference": list(self.reference),
            "current": list(self.current),
            "count": self.count,
            "reference_count": self.reference_count,
        }


@functools.cache
def _noise_quantile(dof: int) -> float:
    return float(stats.chi2.isf(NOISE_LEVEL, dof))


def status_of(psi: float, critical_psi: float, current_count: int, reference_count: int) -> Status:
    if current_count < MIN_CURRENT or reference_count == 0:
        return "insufficient"
    if psi >= max(ACT_PSI, critical_psi):
        return "act"
    if psi >= max(WATCH_PSI, critical_psi):
        return "watch"
    return "stable"


def _proportions(counts: np.ndarray) -> tuple[float, ...]:
    total = int(counts.sum())
    return tuple(float(c) / total for c in counts) if total else (0.0,) * counts.size


def assess(profile: BinProfile, counts: np.ndarray) -> list[ColumnDrift]:
    """Drift of every column of ``counts`` (n_columns, WIDTH) against ``profile``."""
    drifts = []
    for j, name in enumerate(profile.names):
        b = profile.n_bins(j)
        ref, cur = profile.reference[j, :b], counts[j, :b]
        n, m = int(ref.sum()), int(cur.sum())
        value = kernels.psi(ref, cur)
        if b > 1 and n > 0 and m > 0:
            noise = 1.0 / n + 1.0 / m
            p_value = float(stats.chi2.sf(value / noise, b - 1))
            critical = _noise_quantile(b - 1) * noise
        else:
            p_value, critical = 1.0, math.inf
        total = m + int(counts[j, MISSING])
        drifts.append(
            ColumnDrift(
                index=j,
                name=name,
                categorical=profile.categorical(j),
                psi=value,
                p_value=p_value,
                critical_psi=critical,
                status=status_of(value, critical, m, n),
                out_of_range=int(counts[j, OUT_OF_RANGE]) / total if total else 0.0,
                missing=int(counts[j, MISSING]) / total if total else 0.0,
                count=m,
                reference_count=n,
                edges=tuple(float(e) for e in profile.edges(j)),
                reference=_proportions(ref),
                current=_proportions(cur),
            )
        )
    return drifts


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of ``current`` against ``reference`` (two 1-D arrays), exactly as the gateway
    computes it: fit on the reference, bin both with the same kernel, PSI over the bins."""
    reference, current = np.asarray(reference), np.asarray(current)
    if reference.ndim != 1 or current.ndim != 1:
        raise ValueError("psi takes two 1-D arrays")
    profile = BinProfile.fit(reference.reshape(-1, 1), ("x",))
    counts = np.zeros((1, 1, WIDTH), np.int64)
    kernels.observe_columns(counts, 0, np.ascontiguousarray(current).reshape(-1, 1), profile.table)
    b = profile.n_bins(0)
    return kernels.psi(profile.reference[0, :b], counts[0, 0, :b])
