"""Inline monitors: numba streaming histograms for drift (PSI), latency percentiles and quality.

Never imports the gateway, starlette or redis.
"""

from __future__ import annotations

from monitors import kernels, quality_kernels
from monitors.drift import BinProfile, ColumnDrift, Status, psi
from monitors.histograms import LatencyHistogram
from monitors.kernels import ALPHA
from monitors.monitor import VersionMonitor
from monitors.quality import (
    BinaryQuality,
    Figure,
    MulticlassQuality,
    QualityWindows,
    RegressionQuality,
    drop_bound,
)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, drift, latency and quality, so that
    no request pays for compilation."""
    kernels.warm_up()
    quality_kernels.warm_up()


__all__ = [
    "ALPHA",
    "BinProfile",
    "BinaryQuality",
    "ColumnDrift",
    "Figure",
    "LatencyHistogram",
    "MulticlassQuality",
    "QualityWindows",
    "RegressionQuality",
    "Status",
    "VersionMonitor",
    "drop_bound",
    "psi",
    "warm_up",
]
