"""Quality: how right a model version is, from labels that arrive late, and before they arrive.

Accumulators, mergeable by adding and sent across a fleet as bytes:
- ``BinaryQuality``: a positive-class score against a 0/1 label. Realized: confusion counts at
  the threshold (p ≥ threshold predicts positive), accuracy, precision, recall, false-positive
  rate, Brier score, log loss and ROC AUC (from score histograms by label, see
  monitors/quality_kernels.py). Estimated from the served scores alone (CBPE, below).
- ``RegressionQuality``: MAE, RMSE and bias (mean of prediction - target).
- ``MulticlassQuality``: accuracy, macro recall, and recall and precision per class.

Every figure is a ``Figure``: value, confidence interval, and the sample size it rests on.
- Proportions (accuracy, precision, recall, false-positive rate): the Wilson score interval,
  good at small n and near 0 or 1, where the Wald interval fails.
- Means (Brier, log loss, MAE, bias): mean ± z·s/√n with s the sample standard deviation (kept
  as the sum of squared deviations, M2, merged with Chan's formula), the normal approximation
  of the central limit theorem; no interval below n = 2. RMSE: the square roots of the MSE's
  interval (the square root is monotone, so the coverage carries over).
- ROC AUC: value ± z·SE with the Hanley–McNeil (1982) standard error, widened on each side by
  the binning's error bound, ½·(share of pairs within one bin), so the interval covers the
  exact AUC's; at AUC 0 or 1 the Hanley–McNeil SE is 0 (the guards wait for ``min_labels``).
Bounds are clipped into the figure's range ([0, 1], or ≥ 0 for losses).

CBPE (confidence-based performance estimation) assumes calibrated scores: a served score p is
the probability that the label is 1. Then the expected confusion counts are E[TP] = Σp and
E[FP] = Σ(1 - p) over predicted positives, E[FN] = Σp and E[TN] = Σ(1 - p) over predicted
negatives, and the estimated accuracy, precision, recall and false-positive rate follow from
them. Each row is correct with probability q = p or 1 - p, so the realized counts on those rows
would vary with variance Σp(1 - p): the estimate's interval is where the realized figure would
fall, were the model calibrated (normal approximation; delta method for the ratios). The
estimated AUC weighs each bin of the served-score histogram by its score v as positives and by
1 - v as negatives; its interval uses Hanley–McNeil with those expected counts. A realized
figure outside the estimate's interval says the relation between scores and labels moved
(concept drift) or the scores were never calibrated.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

import numpy as np

from monitors import quality_kernels as qk
from monitors.windows import Window

Kind = Literal["count", "proportion", "mean"]

BINARY_FIGURES = (
    "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "false_positive_rate",
    "brier", "log_loss", "roc_auc",
)  # fmt: skip
ESTIMATED_FIGURES = (
    "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "false_positive_rate", "roc_auc",
)  # fmt: skip
REGRESSION_FIGURES = ("mae", "rmse", "bias")
MULTICLASS_FIGURES = ("accuracy", "macro_recall")
MAX_CLASSES = 1000

_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class Figure:
    """One quality figure. ``value`` is None when n == 0 or the figure is undefined (precision
    with no positive predicted); ``low`` and ``high`` bound it at the requested confidence
    (None when there is no interval, e.g. a mean of one value).

    For ``drop_bound``: ``kind`` (a count, a proportion: Wilson and Newcombe, or a mean:
    normal), ``se`` the standard error of a mean (or of an estimate), ``bias_bound`` a bound on
    the figure's error beyond sampling (the AUC's binning), and ``higher_is_better`` (False for
    the false-positive rate and every loss; None when neither direction is better: a bias)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    se: float | None = None
    kind: Kind = "mean"
    higher_is_better: bool | None = True
    bias_bound: float = 0.0

    def as_json(self) -> dict[str, float | int | None]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def _z(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence``; ValueError unless 0 < it < 1."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    return _NORMAL.inv_cdf(0.5 + confidence / 2.0)


def wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of ``successes``/``n`` (n > 0) at normal quantile ``z``."""
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(max(p * (1.0 - p) / n + z2n / (4.0 * n), 0.0))
    return max(center - half, 0.0), min(center + half, 1.0)


def count(value: int, n: int) -> Figure:
    return Figure(float(value), float(value), float(value), n, kind="count")


def proportion(successes: int, n: int, z: float, higher_is_better: bool = True) -> Figure:
    """``successes``/``n`` with its Wilson interval; value None when n == 0."""
    if n == 0:
        return Figure(None, None, None, 0, kind="proportion", higher_is_better=higher_is_better)
    p = successes / n
    low, high = wilson(successes, n, z)
    se = math.sqrt(p * (1.0 - p) / n)
    return Figure(p, low, high, n, se, "proportion", higher_is_better)


def mean(
    total: float,
    m2: float,
    n: int,
    z: float,
    low_limit: float = -math.inf,
    high_limit: float = math.inf,
    higher_is_better: bool | None = False,
) -> Figure:
    """``total``/``n`` ± z·s/√n (s² = M2/(n - 1)), clipped into the limits."""
    if n == 0:
        return Figure(None, None, None, 0, higher_is_better=higher_is_better)
    value = float(total) / n
    if n < 2:
        return Figure(value, None, None, n, higher_is_better=higher_is_better)
    se = math.sqrt(max(float(m2), 0.0) / (n - 1) / n)
    low = min(max(value - z * se, low_limit), high_limit)
    high = max(min(value + z * se, high_limit), low_limit)
    return Figure(value, low, high, n, se, "mean", higher_is_better)


def hanley_mcneil(auc: float, positives: float, negatives: float) -> float:
    """Standard error of an AUC over ``positives`` and ``negatives`` (Hanley & McNeil 1982)."""
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    a2 = auc * auc
    variance = (
        auc * (1.0 - auc) + (positives - 1.0) * (q1 - a2) + (negatives - 1.0) * (q2 - a2)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def _auc_figure(positives: np.ndarray, negatives: np.ndarray, n: int, z: float) -> Figure:
    value, tied = qk.auc(positives, negatives)
    if math.isnan(value):
        return Figure(None, None, None, n)
    bias = 0.5 * tied
    se = hanley_mcneil(value, float(positives.sum()), float(negatives.sum()))
    low = max(value - z * se - bias, 0.0)
    high = min(value + z * se + bias, 1.0)
    return Figure(value, low, high, n, se, "mean", True, bias)


def _estimate(value: float | None, variance: float, n: int, z: float, limit: float) -> Figure:
    """An estimate with the normal interval of standard deviation √variance, clipped into
    [0, limit]."""
    if value is None:
        return Figure(None, None, None, n)
    se = math.sqrt(max(variance, 0.0))
    return Figure(value, max(value - z * se, 0.0), min(value + z * se, limit), n, se)


def _ratio(a: float, b: float, var_a: float, var_b: float) -> tuple[float | None, float]:
    """a/(a + b) for independent a and b, and its delta-method variance."""
    total = a + b
    if not total > 0.0:
        return None, 0.0
    ratio = a / total
    # divided in steps: total⁴ underflows for tiny expected counts
    return ratio, ((1.0 - ratio) ** 2 * var_a + ratio**2 * var_b) / total / total


def drop_bound(candidate: Figure, baseline: Figure, confidence: float) -> float | None:
    """An upper confidence bound, one-sided at ``confidence``, on how much worse ``candidate``
    is than ``baseline``: on baseline - candidate when higher is better, on candidate -
    baseline otherwise (false-positive rate, losses). Negative when the candidate is better.

    Proportions: Newcombe's hybrid score interval for a difference (method 10 of Newcombe
    1998), from each side's Wilson interval at the one-sided quantile. Means (and the AUC):
    the difference + z·√(se_b² + se_c²) + both ``bias_bound``s. None when either figure has no
    value or no standard error, for counts (no comparison between samples of different
    sizes), and when neither direction is better (a bias). ValueError when the two are not the
    same kind of figure."""
    if candidate.kind != baseline.kind or candidate.higher_is_better != baseline.higher_is_better:
        raise ValueError("candidate and baseline are different kinds of figure")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if (
        candidate.value is None
        or baseline.value is None
        or candidate.kind == "count"
        or candidate.higher_is_better is None
    ):
        return None
    z = _NORMAL.inv_cdf(confidence)
    # drop = first - second: the one expected higher minus the other
    first, second = (baseline, candidate) if baseline.higher_is_better else (candidate, baseline)
    assert first.value is not None and second.value is not None
    difference = first.value - second.value
    if candidate.kind == "proportion":
        if first.n == 0 or second.n == 0:
            return None
        _, first_high = wilson(first.value * first.n, first.n, z)
        second_low, _ = wilson(second.value * second.n, second.n, z)
        return difference + math.hypot(first_high - first.value, second.value - second_low)
    if candidate.se is None or baseline.se is None:
        return None
    return (
        difference
        + z * math.hypot(candidate.se, baseline.se)
        + (candidate.bias_bound + baseline.bias_bound)
    )


# Bytes: MAGIC (4 bytes), FORMAT (u8), then a zlib stream of the body; little-endian.
FORMAT = 1
_PREFIX = struct.Struct("<4sB")
_U32 = struct.Struct("<I")
_I8, _F8, _U2 = np.dtype("<i8"), np.dtype("<f8"), np.dtype("<u2")


class _Reader:
    """Reads a decompressed body; every shortfall or leftover is a ValueError."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.body):
            raise ValueError("quality bytes are truncated")
        chunk = self.body[self.at : self.at + n]
        self.at += n
        return chunk

    def array(self, dtype: np.dtype[Any], n: int) -> np.ndarray:
        values: np.ndarray = np.frombuffer(self.take(n * dtype.itemsize), dtype).astype(
            dtype.newbyteorder("=")
        )
        return values

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def done(self) -> None:
        if self.at != len(self.body):
            raise ValueError("quality bytes have trailing data")


def _pack(magic: bytes, parts: Sequence[bytes]) -> bytes:
    return _PREFIX.pack(magic, FORMAT) + zlib.compress(b"".join(parts), 1)


def _unpack(raw: bytes, magic: bytes, max_body: int) -> _Reader:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ValueError("quality bytes must be bytes")
    raw = bytes(raw)
    if len(raw) < _PREFIX.size:
        raise ValueError("quality bytes are truncated")
    found, version = _PREFIX.unpack_from(raw)
    if found != magic:
        raise ValueError(f"not {magic.decode()} quality bytes")
    if version != FORMAT:
        raise ValueError(f"unknown quality format {version}")
    inflate = zlib.decompressobj()
    try:
        body = inflate.decompress(raw[_PREFIX.size :], max_body)
    except zlib.error as exc:
        raise ValueError(f"quality bytes are damaged: {exc}") from None
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise ValueError("quality bytes are damaged or too long")
    return _Reader(body)


_UNSIGNED: dict[int, np.dtype[np.unsignedinteger[Any]]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}
_ROW = struct.Struct("<BB")
_SPARSE, _DENSE = 0, 1


def _row_bytes(width: int) -> int:
    """The most bytes ``_encode_row`` writes for a row of ``width`` counts."""
    return _ROW.size + max(4 + 10 * width, 8 * width)


def _encode_row(row: np.ndarray) -> bytes:
    """A row of non-negative counts in the smaller of two forms: sparse (u32 n, u16 indices,
    values) or dense (every value), each value in the narrowest unsigned width that holds the
    largest (1, 2, 4 or 8 bytes)."""
    n_nonzero = int(np.count_nonzero(row))
    largest = int(row.max(initial=0))
    size = next(k for k in (1, 2, 4) if largest < 1 << (8 * k)) if largest < 1 << 32 else 8
    dtype = _UNSIGNED[size]
    if n_nonzero * (2 + size) + 4 < row.size * size:
        (nonzero,) = np.nonzero(row)
        return b"".join(
            (
                _ROW.pack(_SPARSE, size),
                _U32.pack(nonzero.size),
                nonzero.astype(_U2).tobytes(),
                row[nonzero].astype(dtype).tobytes(),
            )
        )
    return _ROW.pack(_DENSE, size) + row.astype(dtype).tobytes()


def _decode_row(reader: _Reader, width: int) -> np.ndarray:
    mode, size = _ROW.unpack(reader.take(_ROW.size))
    if size not in _UNSIGNED or mode not in (_SPARSE, _DENSE):
        raise ValueError("unknown histogram encoding")
    if mode == _DENSE:
        values = reader.array(_UNSIGNED[size], width)
    else:
        n = reader.u32()
        if n > width:
            raise ValueError("a histogram has more bins than its layout")
        index = reader.array(_U2, n).astype(np.int64)
        values = reader.array(_UNSIGNED[size], n)
        if n and (index[-1] >= width or np.any(np.diff(index) <= 0) or not values.all()):
            raise ValueError("histogram bins out of order, out of range or empty")
    if values.size and int(values.max()) > np.iinfo(np.int64).max:
        raise ValueError("histogram count out of range")
    row = np.zeros(width, np.int64)
    if mode == _DENSE:
        row[:] = values
    else:
        row[index] = values
    return row


def _check_sums(tallies: np.ndarray, sums: np.ndarray) -> None:
    if np.any(tallies < 0):
        raise ValueError("negative counts")
    if not np.all(np.isfinite(sums)) or np.any(sums[1::2] < 0):
        raise ValueError("sums must be finite, their squared deviations non-negative")


def _as_float64(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {array.dtype}")
    flat: np.ndarray = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)
    return flat


def _pairs(
    first: np.ndarray, second: np.ndarray, names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays flat, contiguous float64; ValueError when not numeric or sizes differ."""
    a, b = _as_float64(first, names[0]), _as_float64(second, names[1])
    if a.size != b.size:
        raise ValueError(f"{a.size} {names[0]} but {b.size} {names[1]}")
    return a, b


class _Tallied:
    """Tallies ``(N, REJECTED)``: labelled rows and rejected rows."""

    __slots__ = ("_tallies",)

    def __init__(self) -> None:
        self._tallies = np.zeros(2, np.int64)

    @property
    def labelled(self) -> int:
        return int(self._tallies[qk.N])

    @property
    def rejected(self) -> int:
        return int(self._tallies[1])


_SCORE_DTYPES = frozenset(np.dtype(d) for d in qk.SCORE_DTYPES)


class BinaryQuality:
    """Binary classification: the positive-class score (clipped into [0, 1]) against labels
    0/1. ``observe`` and ``observe_unlabelled`` return the number of rows rejected (NaN or ±inf
    scores, labels other than 0 and 1), which are counted (``rejected``,
    ``rejected_unlabelled``) and otherwise ignored. The histograms (384 KiB) are allocated at
    the first row. Not thread-safe: one writer."""

    __slots__ = ("_counts", "_sums", "_tallies", "threshold")

    MAGIC = b"TNQB"

    def __init__(self, threshold: float = 0.5) -> None:
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        self.threshold = threshold
        self._counts: np.ndarray | None = None
        self._tallies = np.zeros(qk.N_TALLIES, np.int64)
        self._sums = np.zeros(qk.N_SUMS, np.float64)

    def _allocated(self) -> np.ndarray:
        if self._counts is None:
            self._counts = np.zeros((3, qk.N_BINS), np.int64)
        return self._counts

    @property
    def counts(self) -> np.ndarray:
        """The histograms (rows negatives, positives, served; see quality_kernels), a copy."""
        return np.zeros((3, qk.N_BINS), np.int64) if self._counts is None else self._counts.copy()

    def _histograms(self) -> np.ndarray:
        """The histograms, not to be written: the live array, or zeros before the first row."""
        return np.zeros((3, qk.N_BINS), np.int64) if self._counts is None else self._counts

    def observe(self, scores: np.ndarray, labels: np.ndarray) -> int:
        """Add labelled pairs (any shapes of equal size); ValueError when the sizes differ or
        an array is not numeric."""
        s, y = _pairs(scores, labels, ("scores", "labels"))
        rejected: int = qk.observe_labelled(
            self._allocated(), self._tallies, self._sums, s, y, self.threshold
        )
        return rejected

    def observe_unlabelled(self, scores: np.ndarray) -> int:
        """Add served scores (the hot path: once per request, any shape)."""
        if scores.dtype not in _SCORE_DTYPES:
            scores = _as_float64(scores, "scores")
        elif not scores.flags.c_contiguous:
            scores = np.ascontiguousarray(scores)
        if scores.ndim != 1:
            scores = scores.reshape(-1)
        counts = self._counts
        rejected: int = qk.observe_served(
            self._allocated() if counts is None else counts,
            self._tallies,
            self._sums,
            scores,
            self.threshold,
        )
        return rejected

    def merge(self, other: BinaryQuality) -> None:
        """Add ``other`` into this one; ValueError when the thresholds differ."""
        if other.threshold != self.threshold:
            raise ValueError(
                f"cannot merge quality at threshold {other.threshold} into {self.threshold}"
            )
        if other._counts is not None:
            self._allocated()[...] += other._counts
        n_a, n_b = float(self.labelled), float(other.labelled)
        for at in (qk.BRIER_SUM, qk.LOG_LOSS_SUM):
            qk.merge_moments(self._sums, n_a, other._sums, n_b, at)
        self._sums[qk.S_P_POSITIVE :] += other._sums[qk.S_P_POSITIVE :]
        self._tallies += other._tallies

    @property
    def labelled(self) -> int:
        t = self._tallies
        return int(t[qk.TP] + t[qk.FP] + t[qk.TN] + t[qk.FN])

    @property
    def unlabelled(self) -> int:
        return int(self._tallies[qk.S_N])

    @property
    def rejected(self) -> int:
        return int(self._tallies[qk.REJECTED])

    @property
    def rejected_unlabelled(self) -> int:
        return int(self._tallies[qk.S_REJECTED])

    def realized(self, confidence: float = 0.95) -> dict[str, Figure]:
        """The figures over the labelled pairs (``BINARY_FIGURES``): counts exact, proportions
        with Wilson intervals, Brier and log loss normal, ROC AUC Hanley–McNeil + binning."""
        z = _z(confidence)
        t = self._tallies
        tp, fp, tn, fn = (int(t[k]) for k in (qk.TP, qk.FP, qk.TN, qk.FN))
        n = tp + fp + tn + fn
        s = self._sums
        counts = self._histograms()
        return {
            "tp": count(tp, n),
            "fp": count(fp, n),
            "tn": count(tn, n),
            "fn": count(fn, n),
            "accuracy": proportion(tp + tn, n, z),
            "precision": proportion(tp, tp + fp, z),
            "recall": proportion(tp, tp + fn, z),
            "false_positive_rate": proportion(fp, fp + tn, z, higher_is_better=False),
            "brier": mean(s[qk.BRIER_SUM], s[qk.BRIER_M2], n, z, 0.0, 1.0),
            "log_loss": mean(s[qk.LOG_LOSS_SUM], s[qk.LOG_LOSS_M2], n, z, 0.0),
            "roc_auc": _auc_figure(counts[qk.POSITIVE], counts[qk.NEGATIVE], n, z),
        }

    def estimated(self, confidence: float = 0.95) -> dict[str, Figure]:
        """CBPE from the served scores (``ESTIMATED_FIGURES``; see the module): expected counts
        and the figures they imply, each interval where the realized figure over the same rows
        would fall if the scores were calibrated. n: served rows (precision: predicted
        positives; recall and false-positive rate: the expected positives or negatives)."""
        z = _z(confidence)
        t, s = self._tallies, [float(x) for x in self._sums]
        n, n_positive = int(t[qk.S_N]), int(t[qk.S_POSITIVE])
        n_negative = n - n_positive
        tp, fn = s[qk.S_P_POSITIVE], s[qk.S_P_NEGATIVE]
        fp, tn = n_positive - tp, n_negative - fn
        var_p, var_n = s[qk.S_VAR_POSITIVE], s[qk.S_VAR_NEGATIVE]
        recall, var_recall = _ratio(tp, fn, var_p, var_n)
        fpr, var_fpr = _ratio(fp, tn, var_p, var_n)
        accuracy = (tp + tn) / n if n else None
        precision = tp / n_positive if n_positive else None
        served = self._histograms()[qk.SERVED].astype(np.float64)
        auc = _auc_figure(served * qk.BIN_VALUES, served * (1.0 - qk.BIN_VALUES), n, z)
        return {
            "tp": _estimate(tp, var_p, n, z, n_positive),
            "fp": _estimate(fp, var_p, n, z, n_positive),
            "tn": _estimate(tn, var_n, n, z, n_negative),
            "fn": _estimate(fn, var_n, n, z, n_negative),
            "accuracy": _estimate(accuracy, (var_p + var_n) / max(n, 1) ** 2, n, z, 1.0),
            "precision": _estimate(precision, var_p / max(n_positive, 1) ** 2, n_positive, z, 1.0),
            "recall": _estimate(recall, var_recall, round(tp + fn), z, 1.0),
            "false_positive_rate": _with_direction(
                _estimate(fpr, var_fpr, round(fp + tn), z, 1.0), higher_is_better=False
            ),
            "roc_auc": auc,
        }

    def to_bytes(self) -> bytes:
        """Compact bytes for a fleet: the threshold, tallies, sums and the non-zero bins."""
        counts = self._histograms()
        return _pack(
            self.MAGIC,
            [
                struct.pack("<d", self.threshold),
                self._tallies.astype(_I8).tobytes(),
                self._sums.astype(_F8).tobytes(),
                *(_encode_row(counts[row]) for row in range(3)),
            ],
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> BinaryQuality:
        """Decode ``to_bytes``; ValueError for anything else, damaged or inconsistent."""
        max_body = 8 + 8 * (qk.N_TALLIES + qk.N_SUMS) + 3 * _row_bytes(qk.N_BINS)
        reader = _unpack(raw, cls.MAGIC, max_body)
        (threshold,) = struct.unpack("<d", reader.take(8))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold out of [0, 1]")
        tallies = reader.array(_I8, qk.N_TALLIES)
        sums = reader.array(_F8, qk.N_SUMS)
        counts = np.stack([_decode_row(reader, qk.N_BINS) for _ in range(3)])
        reader.done()
        _check_sums(tallies, sums)
        if np.any(sums < 0):
            raise ValueError("negative sums")
        t = tallies
        if (
            counts[qk.NEGATIVE].sum() != t[qk.FP] + t[qk.TN]
            or counts[qk.POSITIVE].sum() != t[qk.TP] + t[qk.FN]
            or counts[qk.SERVED].sum() != t[qk.S_N]
            or t[qk.S_POSITIVE] > t[qk.S_N]
        ):
            raise ValueError("histograms and counts disagree")
        quality = cls(threshold)
        quality._tallies, quality._sums = tallies, sums
        quality._counts = counts if counts.any() else None
        return quality


def _with_direction(figure: Figure, higher_is_better: bool | None) -> Figure:
    return Figure(
        figure.value, figure.low, figure.high, figure.n, figure.se, figure.kind, higher_is_better
    )


class RegressionQuality(_Tallied):
    """Regression: error e = prediction - target. ``observe`` returns the number of rows
    rejected (NaN or ±inf on either side, |e| > 1e60), counted in ``rejected``."""

    __slots__ = ("_sums",)

    MAGIC = b"TNQR"

    def __init__(self) -> None:
        super().__init__()
        self._sums = np.zeros(qk.N_REGRESSION_SUMS, np.float64)

    def observe(self, predictions: np.ndarray, targets: np.ndarray) -> int:
        p, t = _pairs(predictions, targets, ("predictions", "targets"))
        rejected: int = qk.observe_regression(self._tallies, self._sums, p, t)
        return rejected

    def merge(self, other: RegressionQuality) -> None:
        n_a, n_b = float(self.labelled), float(other.labelled)
        for at in range(0, qk.N_REGRESSION_SUMS, 2):
            qk.merge_moments(self._sums, n_a, other._sums, n_b, at)
        self._tallies += other._tallies

    def realized(self, confidence: float = 0.95) -> dict[str, Figure]:
        """MAE and bias: normal intervals; RMSE: the square roots of the MSE's interval."""
        z = _z(confidence)
        n, s = self.labelled, self._sums
        mse = mean(s[qk.SQUARE_SUM], s[qk.SQUARE_M2], n, z, 0.0)
        if mse.value is None:
            rmse = mse
        else:
            value = math.sqrt(mse.value)
            # delta method, for drop_bound: se(√x) = se(x)/(2√x)
            se = None if mse.se is None else (mse.se / (2 * value) if value > 0 else 0.0)
            low = None if mse.low is None else math.sqrt(mse.low)
            high = None if mse.high is None else math.sqrt(mse.high)
            rmse = Figure(value, low, high, n, se, "mean", False)
        return {
            "mae": mean(s[qk.ABS_SUM], s[qk.ABS_M2], n, z, 0.0),
            "rmse": rmse,
            "bias": mean(s[qk.ERROR_SUM], s[qk.ERROR_M2], n, z, higher_is_better=None),
        }

    def to_bytes(self) -> bytes:
        return _pack(
            self.MAGIC, [self._tallies.astype(_I8).tobytes(), self._sums.astype(_F8).tobytes()]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> RegressionQuality:
        reader = _unpack(raw, cls.MAGIC, 16 + 8 * qk.N_REGRESSION_SUMS)
        tallies = reader.array(_I8, 2)
        sums = reader.array(_F8, qk.N_REGRESSION_SUMS)
        reader.done()
        _check_sums(tallies, sums)
        if sums[qk.ABS_SUM] < 0 or sums[qk.SQUARE_SUM] < 0:
            raise ValueError("negative sums")
        quality = cls()
        quality._tallies, quality._sums = tallies, sums
        return quality


class MulticlassQuality(_Tallied):
    """Multiclass: predicted class index against label index, ``n_classes`` (2 ..
    MAX_CLASSES) fixed. ``observe`` returns the number of rows rejected (an index that is not
    an integer in [0, n_classes)), counted in ``rejected``."""

    __slots__ = ("_counts", "n_classes")

    MAGIC = b"TNQM"

    def __init__(self, n_classes: int) -> None:
        if not 2 <= n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes must be within [2, {MAX_CLASSES}], got {n_classes}")
        self.n_classes = int(n_classes)
        super().__init__()
        self._counts = np.zeros((3, self.n_classes), np.int64)

    def observe(self, predicted: np.ndarray, labels: np.ndarray) -> int:
        p, y = _pairs(predicted, labels, ("predictions", "labels"))
        rejected: int = qk.observe_multiclass(self._counts, self._tallies, p, y)
        return rejected

    def merge(self, other: MulticlassQuality) -> None:
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes} classes into {self.n_classes}")
        self._counts += other._counts
        self._tallies += other._tallies

    def realized(self, confidence: float = 0.95) -> dict[str, Figure]:
        """Accuracy (Wilson) and macro recall: the mean recall over the K' classes that have
        labels, with the normal interval of variance Σ rₖ(1 - rₖ)/sₖ / K'² (classes independent
        given their support sₖ), n the labelled rows."""
        z = _z(confidence)
        n = self.labelled
        support, correct = self._counts[qk.SUPPORT], self._counts[qk.CORRECT]
        seen = support > 0
        if seen.any():
            recall = correct[seen] / support[seen]
            value = float(recall.mean())
            k = int(seen.sum())
            se = math.sqrt(float(np.sum(recall * (1.0 - recall) / support[seen]))) / k
            low, high = max(value - z * se, 0.0), min(value + z * se, 1.0)
            macro = Figure(value, low, high, n, se, "mean")
        else:
            macro = Figure(None, None, None, n)
        return {"accuracy": proportion(int(correct.sum()), n, z), "macro_recall": macro}

    def per_class(self, confidence: float = 0.95) -> list[dict[str, Figure]]:
        """For each class: ``recall`` (n: its labels) and ``precision`` (n: its predictions)."""
        z = _z(confidence)
        support, predicted, correct = self._counts
        return [
            {
                "recall": proportion(int(c), int(s), z),
                "precision": proportion(int(c), int(p), z),
            }
            for s, p, c in zip(support, predicted, correct, strict=True)
        ]

    def to_bytes(self) -> bytes:
        return _pack(
            self.MAGIC,
            [
                _U32.pack(self.n_classes),
                self._tallies.astype(_I8).tobytes(),
                *(_encode_row(self._counts[row]) for row in range(3)),
            ],
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MulticlassQuality:
        reader = _unpack(raw, cls.MAGIC, 4 + 16 + 3 * _row_bytes(MAX_CLASSES))
        n_classes = reader.u32()
        if not 2 <= n_classes <= MAX_CLASSES:
            raise ValueError("n_classes out of range")
        tallies = reader.array(_I8, 2)
        counts = np.stack([_decode_row(reader, n_classes) for _ in range(3)])
        reader.done()
        if np.any(tallies < 0):
            raise ValueError("negative counts")
        n = tallies[qk.N]
        if (
            counts[qk.SUPPORT].sum() != n
            or counts[qk.PREDICTED].sum() != n
            or np.any(counts[qk.CORRECT] > np.minimum(counts[qk.SUPPORT], counts[qk.PREDICTED]))
        ):
            raise ValueError("class counts disagree")
        quality = cls(n_classes)
        quality._counts, quality._tallies = counts, tallies
        return quality


class Mergeable(Protocol):
    def merge(self, other: Self) -> None: ...


Q = TypeVar("Q", bound=Mergeable)


class QualityWindows(Generic[Q]):
    """Accumulators over time, as monitors/windows.py: a ring of ``n_slots`` slots of
    ``window_s / n_slots`` seconds (``Window`` maps time to a slot and retires the slots it
    reuses), and the cumulative view since construction. A slot's accumulator is made at its
    first write and dropped when the slot is retired into the cumulative part, so idle time
    holds no memory. Time is passed in, never read. Not thread-safe: one writer."""

    __slots__ = ("_make", "_retired", "_slots", "_window")

    def __init__(self, make: Callable[[], Q], window_s: float, n_slots: int = 12) -> None:
        self._make = make
        self._slots: list[Q | None] = [None] * n_slots
        self._retired = make()
        self._window = Window([self], window_s, n_slots)

    @property
    def window_s(self) -> float:
        return self._window.window_s

    def retire(self, slot: int) -> None:
        """Fold ``slot`` into the cumulative part and drop it (``Window`` calls this)."""
        quality = self._slots[slot]
        if quality is not None:
            self._retired.merge(quality)
            self._slots[slot] = None

    def slot(self, now: float) -> Q:
        """The accumulator to write into at ``now`` (a time before the newest slot's writes
        into the newest slot)."""
        index = self._window.slot(now)
        quality = self._slots[index]
        if quality is None:
            quality = self._slots[index] = self._make()
        return quality

    def window(self, now: float) -> Q:
        """A new accumulator: the merge of the slots inside the window at ``now``."""
        merged = self._make()
        for index in self._window.live(now):
            quality = self._slots[index]
            if quality is not None:
                merged.merge(quality)
        return merged

    def cumulative(self) -> Q:
        """A new accumulator: everything since construction."""
        merged = self._make()
        merged.merge(self._retired)
        for quality in self._slots:
            if quality is not None:
                merged.merge(quality)
        return merged
