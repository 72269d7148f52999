"""A monitor's counts as a value: exported by each process, merged by adding, sent as bytes.

Counts merge only between monitors with the same ``fingerprint``: the same window length, the
same profiles (names, edges or categories and reference counts of every column, tensor names)
and the same count layouts (``kernels.WIDTH``, the latency buckets).

Bytes, version 1: ``MAGIC``, the version (u8), the header length (u32 LE), a UTF-8 JSON header
(fingerprint, window_s, the layout and the number of non-zero latency buckets), then a zlib
stream of, for the window and then the cumulative view: the feature counts and each output's
counts (int64, dense), the latency stats (float64, series × (sum, min, max)) and, per series, the
non-zero latency buckets as indices (u16) then counts (int64). All little-endian. Most of the
~1000 latency buckets are empty, hence sparse.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitors import kernels
from monitors.drift import BinProfile
from monitors.histograms import LatencyHistogram
from monitors.kernels import MAX, MIN, N_LATENCY_BUCKETS, SUM, WIDTH

MAGIC = b"TNMC"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_I8, _F8, _U2 = np.dtype("<i8"), np.dtype("<f8"), np.dtype("<u2")
_INT64 = np.dtype(np.int64)
# zlib level 1 packs the mostly empty or small int64 counts ~5x for ~50 µs; higher levels
# gain little more.
_LEVEL = 1
# A header is a few hundred bytes; a larger claim is garbage, not a reason to parse it.
_MAX_HEADER = 1 << 16

Layout = tuple[int | None, tuple[int, ...], int]


def fingerprint(
    window_s: float,
    features: BinProfile | None,
    outputs: Sequence[tuple[str, BinProfile]],
    series: Sequence[str],
) -> str:
    """Identifies what counts mean: equal fingerprints, mergeable counts (see the module)."""
    layout = {
        "format": VERSION,
        "width": WIDTH,
        "latency": [N_LATENCY_BUCKETS, kernels.LATENCY_LOW, kernels.GAMMA],
        "series": list(series),
        "window_s": float(window_s),
        "features": None if features is None else list(features.names),
        "outputs": [[tensor, list(profile.names)] for tensor, profile in outputs],
    }
    digest = hashlib.blake2b(json.dumps(layout).encode(), digest_size=16)
    profiles = ([features] if features is not None else []) + [p for _, p in outputs]
    for profile in profiles:
        digest.update(profile.table.astype(_F8).tobytes())
        digest.update(profile.reference.astype(_I8).tobytes())
    return digest.hexdigest()


def _check(array: np.ndarray, dtype: np.dtype[Any], width: int, what: str) -> None:
    shape = (array.shape[0] if array.ndim else 0, width)
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(
            f"{what} must be {dtype} of shape {shape}, got {array.dtype} {array.shape}"
        )


@dataclass(frozen=True, slots=True, eq=False)
class ViewCounts:
    """The counts of one view (the current window, or since load). Values: never mutate the
    arrays; ``merge`` returns new ones."""

    features: np.ndarray | None  # (n_columns, kernels.WIDTH) int64
    outputs: tuple[np.ndarray, ...]  # per monitored output tensor, (n_columns, WIDTH) int64
    latency_counts: np.ndarray  # (n_series, N_LATENCY_BUCKETS) int64
    latency_stats: np.ndarray  # (n_series, 3) float64: sum, min, max (empty: 0, +inf, -inf)

    def __post_init__(self) -> None:
        columns = ([self.features] if self.features is not None else []) + list(self.outputs)
        for counts in columns:
            _check(counts, _INT64, WIDTH, "column counts")
        _check(self.latency_counts, _INT64, N_LATENCY_BUCKETS, "latency counts")
        _check(self.latency_stats, np.dtype(np.float64), 3, "latency stats")
        if self.latency_stats.shape[0] != self.latency_counts.shape[0]:
            raise ValueError("latency counts and stats disagree on the number of series")

    @property
    def layout(self) -> Layout:
        """(feature columns or None, each output's columns, latency series)."""
        n_features = None if self.features is None else self.features.shape[0]
        return n_features, tuple(c.shape[0] for c in self.outputs), self.latency_counts.shape[0]

    def merge(self, other: ViewCounts) -> ViewCounts:
        """The sum of both: counts and latency sums add, minima and maxima take the extremes."""
        if self.layout != other.layout:
            raise ValueError(f"cannot merge counts of layouts {self.layout} and {other.layout}")
        stats = self.latency_stats + other.latency_stats
        stats[:, MIN] = np.minimum(self.latency_stats[:, MIN], other.latency_stats[:, MIN])
        stats[:, MAX] = np.maximum(self.latency_stats[:, MAX], other.latency_stats[:, MAX])
        features = None
        if self.features is not None and other.features is not None:
            features = self.features + other.features
        return ViewCounts(
            features,
            tuple(a + b for a, b in zip(self.outputs, other.outputs, strict=True)),
            self.latency_counts + other.latency_counts,
            stats,
        )

    def latency(self) -> list[LatencyHistogram]:
        """A histogram per series, on copies of the arrays."""
        return [
            LatencyHistogram(self.latency_counts[s].copy(), self.latency_stats[s].copy())
            for s in range(self.latency_counts.shape[0])
        ]


@dataclass(frozen=True, slots=True, eq=False)
class MonitorCounts:
    """What ``VersionMonitor.export`` returns and ``report`` reads: a window and a cumulative
    view. The window of a merge is the sum of each process's current window (each ring keeps its
    own slot clock, so the edges of the windows may differ by up to a slot)."""

    fingerprint: str
    window_s: float
    window: ViewCounts
    cumulative: ViewCounts

    def __post_init__(self) -> None:
        if self.window.layout != self.cumulative.layout:
            raise ValueError("the window and the cumulative counts have different layouts")
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError(f"window_s must be positive and finite, got {self.window_s}")

    def merge(self, other: MonitorCounts) -> MonitorCounts:
        """Both added; ValueError unless the fingerprints (and so the layouts) are equal."""
        if other.fingerprint != self.fingerprint or other.window_s != self.window_s:
            raise ValueError(
                f"cannot merge counts of fingerprint {other.fingerprint} "
                f"into {self.fingerprint}: other profiles, layout or window"
            )
        return MonitorCounts(
            self.fingerprint,
            self.window_s,
            self.window.merge(other.window),
            self.cumulative.merge(other.cumulative),
        )

    def to_bytes(self) -> bytes:
        """Compact bytes (see the module); ``from_bytes`` reads them back exactly."""
        views = (self.window, self.cumulative)
        nonzero = [np.flatnonzero(row) for view in views for row in view.latency_counts]
        n_features, outputs, n_series = self.window.layout
        header = json.dumps(
            {
                "fingerprint": self.fingerprint,
                "window_s": self.window_s,
                "features": n_features,
                "outputs": list(outputs),
                "series": n_series,
                "nonzero": [int(indices.size) for indices in nonzero],
            },
            separators=(",", ":"),
        ).encode()
        parts = []
        for v, view in enumerate(views):
            columns = ([view.features] if view.features is not None else []) + list(view.outputs)
            parts += [counts.astype(_I8, copy=False).tobytes() for counts in columns]
            parts.append(view.latency_stats.astype(_F8, copy=False).tobytes())
            for s, row in enumerate(view.latency_counts):
                indices = nonzero[v * n_series + s]
                parts.append(indices.astype(_U2).tobytes())
                parts.append(row[indices].astype(_I8, copy=False).tobytes())
        body = zlib.compress(b"".join(parts), _LEVEL)
        return b"".join((_PREFIX.pack(MAGIC, VERSION, len(header)), header, body))

    @classmethod
    def from_bytes(cls, data: bytes) -> MonitorCounts:
        """The counts ``to_bytes`` wrote; ValueError for anything else (another version,
        truncated or extra bytes, an inconsistent header or counts)."""
        if len(data) < _PREFIX.size:
            raise ValueError("monitor counts: too short")
        magic, version, header_size = _PREFIX.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"monitor counts: not version {VERSION} counts")
        if header_size > _MAX_HEADER or _PREFIX.size + header_size > len(data):
            raise ValueError("monitor counts: truncated header")
        try:
            header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_size]))
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, deep nesting
            raise ValueError("monitor counts: unreadable header") from None
        fingerprint, window_s, n_features, outputs, n_series, nonzero = _header(header)
        n_columns = (n_features or 0) + sum(outputs)
        size = 2 * (n_columns * WIDTH * 8 + n_series * 3 * 8) + sum(nonzero) * 10
        reader = _Reader(_inflate(data[_PREFIX.size + header_size :], size))
        layout = (n_features, tuple(outputs), n_series)
        window = reader.view(layout, nonzero[:n_series])
        return cls(fingerprint, window_s, window, reader.view(layout, nonzero[n_series:]))


def _header(header: Any) -> tuple[str, float, int | None, list[int], int, list[int]]:
    def count(value: Any) -> bool:
        return type(value) is int and 0 <= value < 1 << 20

    keys = {"fingerprint", "window_s", "features", "outputs", "series", "nonzero"}
    if not (isinstance(header, dict) and header.keys() == keys):
        raise ValueError("monitor counts: header fields")
    fingerprint, window_s = header["fingerprint"], header["window_s"]
    features, outputs = header["features"], header["outputs"]
    series, nonzero = header["series"], header["nonzero"]
    valid = (
        isinstance(fingerprint, str)
        and type(window_s) is float
        and 0 < window_s < math.inf
        and (features is None or count(features))
        and isinstance(outputs, list)
        and all(count(n) for n in outputs)
        and count(series)
        and isinstance(nonzero, list)
        and len(nonzero) == 2 * series
        and all(count(n) and n <= N_LATENCY_BUCKETS for n in nonzero)
    )
    if not valid:
        raise ValueError("monitor counts: header values")
    return fingerprint, window_s, features, outputs, series, nonzero


def _inflate(body: bytes, size: int) -> bytes:
    """Exactly ``size`` bytes out of ``body``; never more, so garbage cannot balloon."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, max(size, 1))  # 0 would mean no limit
    except zlib.error:
        raise ValueError("monitor counts: corrupt body") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise ValueError("monitor counts: truncated or extra body")
    return raw


def _check_latency(latency: np.ndarray, stats: np.ndarray) -> None:
    if np.any(latency < 0):
        raise ValueError("monitor counts: negative latency counts")
    empty = latency.sum(axis=1) == 0
    sums, lows, highs = stats[:, SUM], stats[:, MIN], stats[:, MAX]
    blank = (sums == 0) & (lows == math.inf) & (highs == -math.inf)
    filled = np.isfinite(stats).all(axis=1) & (lows <= highs)
    if not np.all(np.where(empty, blank, filled)):
        raise ValueError("monitor counts: latency stats inconsistent with the counts")


class _Reader:
    """Consecutive little-endian arrays out of a buffer, copied to native, writable arrays."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, dtype: np.dtype[Any], count: int) -> np.ndarray:
        end = self.offset + count * dtype.itemsize
        if end > len(self.data):
            raise ValueError("monitor counts: truncated")
        array = np.frombuffer(self.data, dtype, count, self.offset)
        self.offset = end
        return array.astype(dtype.newbyteorder("="))

    def view(self, layout: Layout, nonzero: list[int]) -> ViewCounts:
        n_features, outputs, n_series = layout
        features = None if n_features is None else self.columns(n_features)
        columns = tuple(self.columns(n) for n in outputs)
        stats = self.take(_F8, n_series * 3).reshape(n_series, 3)
        counts = np.zeros((n_series, N_LATENCY_BUCKETS), np.int64)
        for series, size in enumerate(nonzero):
            indices = self.take(_U2, size).astype(np.intp)
            if size and (np.any(np.diff(indices) <= 0) or indices[-1] >= N_LATENCY_BUCKETS):
                raise ValueError("monitor counts: latency buckets out of order or out of range")
            counts[series, indices] = self.take(_I8, size)
        _check_latency(counts, stats)
        return ViewCounts(features, columns, counts, stats)

    def columns(self, n_columns: int) -> np.ndarray:
        counts = self.take(_I8, n_columns * WIDTH).reshape(n_columns, WIDTH)
        if np.any(counts < 0):
            raise ValueError("monitor counts: negative column counts")
        return counts
