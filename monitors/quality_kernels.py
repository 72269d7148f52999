"""Numba kernels of quality (monitors/quality.py), with the conventions of monitors/kernels.py:
pure functions over preallocated arrays, mutating kernels update their first array arguments in
place, edge cases decided here and stated in each docstring, Python callers own the layouts.

Score bins: ``N_BINS`` = 2^14 bins over p ∈ [0, 1], the bin index non-decreasing in p.
- ``LINEAR`` .. ``HIGH_TAIL - 1``: p ∈ [D0, 1 - D0) in bins of ``LINEAR_WIDTH`` = 2^-13
  (D0 = 2^-6), left-closed.
- ``LOW_TAIL`` .. ``LINEAR - 1``: p ∈ [D_MIN, D0) in ``N_TAIL`` log-spaced bins of ratio
  ``TAIL_GAMMA`` = 1 + 2^-7; ``HIGH_TAIL`` .. ``TOP - 1`` the mirror image in 1 - p. At D0 a
  log bin is 2^-13 wide, as wide as a linear bin; each tail is a logit grid of step ≈ 0.0078.
- bin 0 holds p < D_MIN ≈ 8·10⁻¹⁷ (p = 0 included) and ``TOP`` holds 1 - p < D_MIN: every
  float64 short of 1 has 1 - p ≥ 1.1·10⁻¹⁶, so only p = 1 itself reaches ``TOP``.

Why this layout keeps the binned ROC AUC within 0.005 of the exact AUC: the AUC counts each
(positive, negative) pair as 1, ½ or 0; the binned AUC gets every pair in different bins exactly
right and counts a pair within one bin as ½, so its error is at most ½·Σᵢ posᵢ·negᵢ/(P·N), half
the share of pairs that share a bin (``auc`` returns that share). Scores of a real classifier
spread over at least ~0.02 of the middle (164 linear bins) or over a logit range of ~1 in a tail
(128 log bins), which puts the share of pairs in one bin near 1/164 at most, and the error bound
near 0.003; the error itself is far smaller, since pairs inside a bin are split about evenly.
Exact ties (discrete scores) share a bin and are rightly counted as ½, so for them the bound is
loose, not the error. tests/monitors/test_quality.py checks 10⁶-sample cases against the exact
(rank) AUC, concentrated ones included. A uniform grid of 2^14 would give 1/(0.02·2^14) ≈ 0.3 %
shared pairs in [0.49, 0.51], but would put every score above 1 - 6·10⁻⁵ in one bin.

Binary layouts: counts ``(3, N_BINS)`` int64, rows ``NEGATIVE``, ``POSITIVE`` (labelled scores
by label) and ``SERVED`` (unlabelled scores); tallies ``(N_TALLIES,)`` int64 (``TP`` .. ``FN``,
``REJECTED``, then the served ``S_N``, ``S_POSITIVE`` and ``S_REJECTED``); sums ``(N_SUMS,)``
float64: the Brier and log-loss sums and M2 (sum of squared deviations from the mean), and over
the served scores Σp and Σp(1 - p), each for predicted positives and predicted negatives.
Regression: tallies ``(N, REJECTED)``, sums (sum, M2) of the error e, |e| and e². Multiclass:
counts ``(3, n_classes)`` int64, rows ``SUPPORT`` (labels), ``PREDICTED``, ``CORRECT``; tallies
``(N, REJECTED)``.
"""

from __future__ import annotations

import math

import numpy as np

from monitors.kernels import jit

N_BINS = 1 << 14
D0 = 2.0**-6
LINEAR_WIDTH = 2.0**-13
N_LINEAR = round((1.0 - 2.0 * D0) / LINEAR_WIDTH)
TAIL_GAMMA = 1.0 + 2.0**-7
LOG_TAIL_GAMMA = math.log1p(2.0**-7)
N_TAIL = (N_BINS - N_LINEAR - 2) // 2
D_MIN = D0 * math.exp(-N_TAIL * LOG_TAIL_GAMMA)
LOW_TAIL = 1
LINEAR = LOW_TAIL + N_TAIL
HIGH_TAIL = LINEAR + N_LINEAR
TOP = N_BINS - 1

NEGATIVE, POSITIVE, SERVED = 0, 1, 2
TP, FP, TN, FN, REJECTED, S_N, S_POSITIVE, S_REJECTED = range(8)
N_TALLIES = 8
BRIER_SUM, BRIER_M2, LOG_LOSS_SUM, LOG_LOSS_M2 = 0, 1, 2, 3
S_P_POSITIVE, S_P_NEGATIVE, S_VAR_POSITIVE, S_VAR_NEGATIVE = 4, 5, 6, 7
N_SUMS = 8
# Log loss clips p into [EPS, 1 - EPS]: a confident wrong answer costs at most -ln(1e-15) ≈ 34.5.
LOG_LOSS_EPS = 1e-15

N = 0  # regression and multiclass tallies: N, REJECTED
ERROR_SUM, ERROR_M2, ABS_SUM, ABS_M2, SQUARE_SUM, SQUARE_M2 = range(6)
N_REGRESSION_SUMS = 6
# A larger |prediction - target| is rejected: e² stays below 1e120 and the M2 of e² finite.
MAX_ABS_ERROR = 1e60
SUPPORT, PREDICTED, CORRECT = 0, 1, 2


def _bin_edges() -> np.ndarray:
    """Lower edge of every bin and 1.0 last, ``(N_BINS + 1,)``: bin i holds [edges[i],
    edges[i + 1]) in the low tail and the middle, (edges[i], edges[i + 1]] in the high tail."""
    edges = np.empty(N_BINS + 1)
    edges[0] = 0.0
    edges[LOW_TAIL:LINEAR] = D_MIN * TAIL_GAMMA ** np.arange(N_TAIL)
    edges[LINEAR:HIGH_TAIL] = D0 + np.arange(N_LINEAR) * LINEAR_WIDTH
    edges[HIGH_TAIL:TOP] = 1.0 - D_MIN * TAIL_GAMMA ** np.arange(N_TAIL, 0, -1)
    edges[TOP] = 1.0 - D_MIN
    edges[N_BINS] = 1.0
    return edges


BIN_EDGES = _bin_edges()
# The score that stands for a bin (CBPE weighs its count by it): the middle of its edges.
BIN_VALUES = (BIN_EDGES[:-1] + BIN_EDGES[1:]) / 2.0
BIN_VALUES[TOP] = 1.0


@jit
def score_bin(p: float) -> int:
    """Bin of a score ``p`` in [0, 1] (the caller clips and excludes NaN); see the module."""
    if p < D0:
        if p < D_MIN:
            return 0
        k = math.floor(math.log(p / D_MIN) / LOG_TAIL_GAMMA)
        return LOW_TAIL + min(max(k, 0), N_TAIL - 1)
    q = 1.0 - p
    if q > D0:
        return LINEAR + min(int((p - D0) / LINEAR_WIDTH), N_LINEAR - 1)
    if q < D_MIN:
        return TOP
    k = math.floor(math.log(q / D_MIN) / LOG_TAIL_GAMMA)
    return TOP - 1 - min(max(k, 0), N_TAIL - 1)


@jit
def _chan(n_a: float, sum_a: float, m2_a: float, n_b: float, sum_b: float, m2_b: float) -> float:
    """M2 of two samples together from each one's count, sum and M2 (Chan, Golub & LeVeque)."""
    if n_a == 0.0:
        return m2_b
    if n_b == 0.0:
        return m2_a
    delta = sum_b / n_b - sum_a / n_a
    return m2_a + m2_b + delta * delta * n_a * n_b / (n_a + n_b)


@jit
def merge_moments(sums: np.ndarray, n_a: float, other: np.ndarray, n_b: float, at: int) -> None:
    """Merge the (sum, M2) pair at ``sums[at], sums[at + 1]`` of a sample of ``n_a`` with
    ``other``'s pair over ``n_b``, in place."""
    sums[at + 1] = _chan(n_a, sums[at], sums[at + 1], n_b, other[at], other[at + 1])
    sums[at] += other[at]


@jit
def observe_labelled(
    counts: np.ndarray,
    tallies: np.ndarray,
    sums: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
) -> int:
    """Add labelled pairs (1-D ``scores``, any float dtype, and float64 ``labels``) in place;
    returns the number rejected.

    A row is rejected (counted in ``REJECTED``, nothing else) when its score is NaN or ±inf or
    its label is not exactly 0 or 1. Finite scores are clipped into [0, 1]; p ≥ ``threshold``
    predicts positive. Brier term (p - y)², log-loss term -ln(p) or -ln(1 - p) with p clipped
    into [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]. The M2s merge the batch's (sum, M2), taken around a
    shift (the first row's term) for stability, with Chan's formula. Raises ValueError when the
    lengths differ.
    """
    if scores.size != labels.size:
        raise ValueError("scores and labels differ in length")
    rejected = 0
    m = 0
    brier_shift = log_shift = 0.0
    brier_sum = brier_d = brier_d2 = 0.0
    log_sum = log_d = log_d2 = 0.0
    for i in range(scores.size):
        s = np.float64(scores[i])
        y = labels[i]
        if not math.isfinite(s) or (y != 0.0 and y != 1.0):
            rejected += 1
            continue
        p = min(max(s, 0.0), 1.0)
        predicted = p >= threshold
        c = min(max(p, LOG_LOSS_EPS), 1.0 - LOG_LOSS_EPS)
        if y == 1.0:
            counts[POSITIVE, score_bin(p)] += 1
            tallies[TP if predicted else FN] += 1
            loss = -math.log(c)
        else:
            counts[NEGATIVE, score_bin(p)] += 1
            tallies[FP if predicted else TN] += 1
            loss = -math.log1p(-c)
        brier = (p - y) * (p - y)
        if m == 0:
            brier_shift, log_shift = brier, loss
        m += 1
        brier_sum += brier
        log_sum += loss
        d = brier - brier_shift
        brier_d += d
        brier_d2 += d * d
        d = loss - log_shift
        log_d += d
        log_d2 += d * d
    tallies[REJECTED] += rejected
    if m == 0:
        return rejected
    n_a = float(tallies[TP] + tallies[FP] + tallies[TN] + tallies[FN] - m)
    batch = np.empty(N_SUMS)
    batch[BRIER_SUM] = brier_sum
    batch[BRIER_M2] = max(brier_d2 - brier_d * brier_d / m, 0.0)
    batch[LOG_LOSS_SUM] = log_sum
    batch[LOG_LOSS_M2] = max(log_d2 - log_d * log_d / m, 0.0)
    merge_moments(sums, n_a, batch, float(m), BRIER_SUM)
    merge_moments(sums, n_a, batch, float(m), LOG_LOSS_SUM)
    return rejected


@jit
def observe_served(
    counts: np.ndarray, tallies: np.ndarray, sums: np.ndarray, scores: np.ndarray, threshold: float
) -> int:
    """Add served (unlabelled) scores, 1-D any float dtype, in place; returns the number
    rejected (NaN and ±inf, counted in ``S_REJECTED``). Finite scores are clipped into [0, 1]."""
    rejected = 0
    for i in range(scores.size):
        s = np.float64(scores[i])
        if not math.isfinite(s):
            rejected += 1
            continue
        p = min(max(s, 0.0), 1.0)
        counts[SERVED, score_bin(p)] += 1
        tallies[S_N] += 1
        if p >= threshold:
            tallies[S_POSITIVE] += 1
            sums[S_P_POSITIVE] += p
            sums[S_VAR_POSITIVE] += p * (1.0 - p)
        else:
            sums[S_P_NEGATIVE] += p
            sums[S_VAR_NEGATIVE] += p * (1.0 - p)
    tallies[S_REJECTED] += rejected
    return rejected


@jit
def auc(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, share of pairs within one bin) from per-bin weights of positives and negatives
    (counts, or expected counts as floats) over the same ordered bins. A pair in different bins
    counts 1 when the positive's bin is higher, a pair within one bin ½. Both NaN when either
    side weighs nothing. Raises ValueError when the lengths differ."""
    if positives.size != negatives.size:
        raise ValueError("positives and negatives have different numbers of bins")
    below = 0.0
    above_pairs = 0.0
    tied_pairs = 0.0
    total_positive = 0.0
    for i in range(positives.size):
        pos = np.float64(positives[i])
        neg = np.float64(negatives[i])
        above_pairs += pos * below
        tied_pairs += pos * neg
        below += neg
        total_positive += pos
    pairs = total_positive * below
    if not pairs > 0.0:
        return math.nan, math.nan
    return (above_pairs + 0.5 * tied_pairs) / pairs, tied_pairs / pairs


@jit
def observe_regression(
    tallies: np.ndarray, sums: np.ndarray, predictions: np.ndarray, targets: np.ndarray
) -> int:
    """Add (prediction, target) pairs, 1-D float64, in place; returns the number rejected: a
    NaN or ±inf on either side, or |prediction - target| > MAX_ABS_ERROR. For the error
    e = prediction - target, |e| and e²: their sums and M2s (shifted batch, Chan's merge).
    Raises ValueError when the lengths differ."""
    if predictions.size != targets.size:
        raise ValueError("predictions and targets differ in length")
    rejected = 0
    m = 0
    shift = np.zeros(3)
    total = np.zeros(3)
    dev = np.zeros(3)
    dev2 = np.zeros(3)
    terms = np.empty(3)
    for i in range(predictions.size):
        e = predictions[i] - targets[i]
        if not abs(e) <= MAX_ABS_ERROR:
            rejected += 1
            continue
        terms[0], terms[1], terms[2] = e, abs(e), e * e
        if m == 0:
            shift[:] = terms
        m += 1
        for k in range(3):
            d = terms[k] - shift[k]
            total[k] += terms[k]
            dev[k] += d
            dev2[k] += d * d
    tallies[1] += rejected
    if m == 0:
        return rejected
    n_a = float(tallies[N])
    tallies[N] += m
    batch = np.empty(N_REGRESSION_SUMS)
    for k in range(3):
        batch[2 * k] = total[k]
        batch[2 * k + 1] = max(dev2[k] - dev[k] * dev[k] / m, 0.0)
        merge_moments(sums, n_a, batch, float(m), 2 * k)
    return rejected


@jit
def observe_multiclass(
    counts: np.ndarray, tallies: np.ndarray, predicted: np.ndarray, labels: np.ndarray
) -> int:
    """Add (predicted class, label) pairs, 1-D float64 class indices, in place; returns the
    number rejected: either side not an integer in [0, n_classes) (NaN and ±inf included).
    Raises ValueError when the lengths differ."""
    if predicted.size != labels.size:
        raise ValueError("predicted and labels differ in length")
    n_classes = counts.shape[1]
    rejected = 0
    for i in range(predicted.size):
        a = predicted[i]
        b = labels[i]
        if not (0.0 <= a < n_classes and 0.0 <= b < n_classes) or a != math.floor(a):
            rejected += 1
            continue
        if b != math.floor(b):
            rejected += 1
            continue
        guess, truth = int(a), int(b)
        counts[SUPPORT, truth] += 1
        counts[PREDICTED, guess] += 1
        if guess == truth:
            counts[CORRECT, truth] += 1
        tallies[N] += 1
    tallies[1] += rejected
    return rejected


SCORE_DTYPES = (np.float32, np.float64)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) and run every kernel once, for scores of each
    of SCORE_DTYPES and for float64 arrays, writable and read-only (as np.frombuffer decodes)."""
    counts = np.zeros((3, N_BINS), np.int64)
    tallies = np.zeros(N_TALLIES, np.int64)
    sums = np.zeros(N_SUMS)
    for dtype in SCORE_DTYPES:
        for writable in (True, False):
            scores = np.array([0.25, 0.75], dtype)
            scores.setflags(write=writable)
            observe_served(counts, tallies, sums, scores, 0.5)
    for scores_writable in (True, False):
        for labels_writable in (True, False):
            scores, labels = np.array([0.25, 0.75]), np.array([0.0, 1.0])
            scores.setflags(write=scores_writable)
            labels.setflags(write=labels_writable)
            observe_labelled(counts, tallies, sums, scores, labels, 0.5)
            regression = np.zeros(N_REGRESSION_SUMS)
            observe_regression(tallies[:2].copy(), regression, scores, labels)
            observe_multiclass(np.zeros((3, 2), np.int64), tallies[:2].copy(), labels, scores)
    auc(counts[POSITIVE], counts[NEGATIVE])
    auc(counts[SERVED] * BIN_VALUES, counts[SERVED] * (1.0 - BIN_VALUES))
    merge_moments(sums, 1.0, sums.copy(), 1.0, BRIER_SUM)
