"""Inline monitors: numba streaming histograms for drift (PSI) and latency percentiles.

Never imports the gateway, starlette or redis.
"""

from __future__ import annotations

from monitors.drift import BinProfile, ColumnDrift, Status, psi
from monitors.histograms import LatencyHistogram
from monitors.kernels import ALPHA, warm_up
from monitors.monitor import VersionMonitor

__all__ = [
    "ALPHA",
    "BinProfile",
    "ColumnDrift",
    "LatencyHistogram",
    "Status",
    "VersionMonitor",
    "psi",
    "warm_up",
]
