"""Rollout guards: the statistics that judge live windows against a ``GuardSpec``
(router.policy.guard_spec), the verdict, and the policy change a verdict leads to.

Pure: no I/O and no clock. The gateway measures the windows and applies the plans
(gateway/background/guards.py); docs/operations.md describes every field for operators. Small
samples stay honest: error and disagreement ratios are judged by their one-sided Clopper-Pearson
lower bound, p99 latencies by distribution-free order-statistic bounds, drift by the monitors' noise
level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from scipy import special, stats

from router.policy.guard_spec import QUALITY_METRICS, GuardSpec
from router.policy.spec import CanaryDoc, PolicyDoc, ShadowSpec, Subject

Verdict = Literal["pass", "insufficient", "breach"]
CheckStatus = Literal["pass", "breach", "insufficient", "skipped"]
P99 = 0.99


# -- statistics ---------------------------------------------------------------------------------
def ratio_lower_bound(successes: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion: the true ratio is at
    least this with probability ``confidence`` or more, whatever the sample size. 0 when
    ``successes`` is 0 (or ``trials`` is 0)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}, {trials}")
    if successes == 0:
        return 0.0
    return float(special.betaincinv(successes, trials - successes + 1, 1.0 - confidence))


def quantile_ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """1-based ranks ``(lo, hi)`` of the order statistics that bound the q-quantile ξ of a
    continuous distribution from a sample of ``n``, each one-sided at ``confidence``:
    P(X₍lo₎ ≤ ξ) ≥ confidence with ``lo`` the largest such rank (0: no order statistic is a
    lower bound), P(X₍hi₎ ≥ ξ) ≥ confidence with ``hi`` the smallest (n + 1: none is an upper
    bound). X₍k₎ ≤ ξ iff at least k draws fall at or below ξ, a Binomial(n, q) count."""
    if n <= 0:
        return 0, 1
    lo = int(stats.binom.ppf(1.0 - confidence, n, q))
    while lo < n and stats.binom.sf(lo, n, q) >= confidence:  # ppf's float edge: exact ranks
        lo += 1
    while lo > 0 and stats.binom.sf(lo - 1, n, q) < confidence:
        lo -= 1
    hi = int(stats.binom.ppf(confidence, n, q)) + 1
    while hi > 1 and stats.binom.cdf(hi - 2, n, q) >= confidence:
        hi -= 1
    while hi <= n and stats.binom.cdf(hi - 1, n, q) < confidence:
        hi += 1
    return lo, min(hi, n + 1)


class Latencies(Protocol):
    """A latency histogram (monitors.LatencyHistogram): nearest-rank quantiles in seconds."""

    @property
    def count(self) -> int: ...

    def quantile(self, q: float) -> float: ...


def at_rank(latencies: Latencies, rank: int) -> float:
    """The ``rank``-th smallest latency (1-based), as the histogram resolves it."""
    n = latencies.count
    # (rank - 0.5)/n lands numpy's inverted_cdf index ceil(n·q - 1) on rank - 1 without float
    # round-off moving it to a neighbour
    return latencies.quantile((rank - 0.5) / n)


def p99_bounds(latencies: Latencies, confidence: float) -> tuple[float | None, float | None]:
    """(lower, upper) confidence bounds of the p99 latency; None where the sample is too small."""
    lo, hi = quantile_ranks(latencies.count, P99, confidence)
    lower = at_rank(latencies, lo) if lo >= 1 else None
    upper = at_rank(latencies, hi) if hi <= latencies.count else None
    return lower, upper


# -- figures, checks and verdicts --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ColumnPsi:
    """One monitored column in the version's drift window (monitors.drift)."""

    name: str
    psi: float
    critical_psi: float  # the PSI sampling noise alone reaches 1 % of the time; inf if undefined
    sufficient: bool  # status is not "insufficient"


@dataclass(frozen=True, slots=True)
class VersionWindow:
    """A version's figures over the window: requests answered (any status), the 5xx among
    them, the latency of successful ones, and drift columns from the monitor's own window."""

    requests: int = 0
    errors: int = 0
    latency: Latencies | None = None
    features: tuple[ColumnPsi, ...] = ()
    outputs: tuple[ColumnPsi, ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowWindow:
    """A shadow version's comparisons with the primary over the window."""

    compared: int = 0
    rows: int = 0
    disagreements: int = 0


@dataclass(frozen=True, slots=True)
class QualityFigure:
    """One quality figure of a version (monitors.quality.Figure): its value and confidence
    interval at the guards' confidence, over ``n`` labels (None: undefined or too few)."""

    value: float | None
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True, slots=True)
class QualityWindow:
    """A version's quality from the labels joined to its predictions: ``labels`` labelled
    predictions, each metric's figure, and for a subject with a baseline each metric's upper
    confidence bound on how much worse it is than the baseline (monitors.quality.drop_bound;
    None: no bound) with the baseline's labels."""

    labels: int = 0
    figures: Mapping[str, QualityFigure] = field(default_factory=dict)
    drops: Mapping[str, float | None] = field(default_factory=dict)
    baseline_labels: int = 0


@dataclass(frozen=True, slots=True)
class Figures:
    versions: Mapping[str, VersionWindow]
    shadows: Mapping[str, ShadowWindow] = field(default_factory=dict)
    quality: Mapping[str, QualityWindow] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Check:
    guard: str  # a condition name, or "min_requests" for the sample-size gate
    version: str
    status: CheckStatus
    value: float | None
    threshold: float
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "version": self.version,
            "status": self.status,
            "value": self.value,
            "threshold": self.threshold,
            **self.detail,
        }

    def describe(self) -> str:
        metric = self.guard.removeprefix("min_quality.")
        if metric != self.guard and QUALITY_METRICS.get(metric, False):
            op = "<"  # a floor: the lower bound below it breaches
        else:
            op = "≥" if self.guard.endswith("psi") else ">"
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        limit = f"{op} {self.threshold:g}"
        return f"{self.guard} {self.status} for version {self.version}: {value} {limit}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    verdict: Verdict
    checks: tuple[Check, ...]

    @property
    def breaches(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "breach")

    def as_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [c.as_json() for c in self.checks]}


def evaluate(spec: GuardSpec, doc: PolicyDoc, figures: Figures) -> Evaluation:
    """Judge every subject (gated on ``min_requests`` in its window) and every shadow version.
    The verdict is ``breach`` when any check breaches, else ``insufficient`` when a subject's
    check lacks data, else ``pass``; shadow checks lacking data hold nothing back."""
    checks: list[Check] = []
    for subject in doc.subjects():
        if spec.judges_quality:  # labels arrive late: judged whatever the window's traffic
            quality = figures.quality.get(subject.version, QualityWindow())
            checks.extend(_quality_checks(spec, subject, quality))
        window = figures.versions.get(subject.version, VersionWindow())
        if window.requests < spec.min_requests:
            gate = Check(
                "min_requests",
                subject.version,
                "insufficient",
                float(window.requests),
                float(spec.min_requests),
                {"requests": window.requests},
            )
            checks.append(gate)
            continue
        baseline = figures.versions.get(subject.baseline) if subject.baseline else None
        checks.extend(_version_checks(spec, subject, window, baseline))
    if spec.max_shadow_disagreement is not None:
        for shadow in doc.shadow_versions():
            checks.append(_shadow_check(spec, shadow, figures.shadows.get(shadow, ShadowWindow())))
    if any(c.status == "breach" for c in checks):
        verdict: Verdict = "breach"
    elif any(c.status == "insufficient" and c.guard != "max_shadow_disagreement" for c in checks):
        verdict = "insufficient"
    else:
        verdict = "pass"
    return Evaluation(verdict, tuple(checks))


def _version_checks(
    spec: GuardSpec, subject: Subject, window: VersionWindow, baseline: VersionWindow | None
) -> list[Check]:
    version, c = subject.version, spec.confidence
    checks: list[Check] = []
    if spec.max_error_ratio is not None:
        bound = ratio_lower_bound(window.errors, window.requests, c)
        detail: dict[str, Any] = {
            "requests": window.requests,
            "errors": window.errors,
            "error_ratio": window.errors / window.requests,
            "lower_bound": bound,
            "confidence": c,
        }
        checks.append(_compare("max_error_ratio", version, bound, spec.max_error_ratio, detail))
    latency = window.latency if window.latency is not None and window.latency.count else None
    lower = p99_bounds(latency, c)[0] if latency is not None else None
    point: dict[str, Any] = {
        "p99_s": latency.quantile(P99) if latency else None,
        "p99_lower_s": lower,
    }
    if spec.max_p99_s is not None:
        if lower is None:  # no successful request: the error guard speaks for it
            checks.append(_skipped("max_p99_s", version, spec.max_p99_s, "no latency observed"))
        else:
            checks.append(_compare("max_p99_s", version, lower, spec.max_p99_s, point))
    if spec.max_p99_ratio_to_baseline is not None and subject.baseline is not None:
        threshold = spec.max_p99_ratio_to_baseline
        base = baseline.latency if baseline is not None else None
        upper = p99_bounds(base, c)[1] if base is not None and base.count else None
        if lower is None or upper is None or upper <= 0:
            why = "no latency observed" if lower is None else "baseline sample too small"
            checks.append(_skipped("max_p99_ratio_to_baseline", version, threshold, why))
        else:
            assert base is not None
            versus: dict[str, Any] = {
                **point,
                "baseline": subject.baseline,
                "baseline_p99_s": base.quantile(P99),
                "baseline_p99_upper_s": upper,
                "confidence": c,
            }
            name = "max_p99_ratio_to_baseline"
            checks.append(_compare(name, version, lower / upper, threshold, versus))
    if spec.max_psi is not None:
        checks.append(_psi_check("max_psi", version, window.features, spec.max_psi))
    if spec.max_prediction_psi is not None:
        name = "max_prediction_psi"
        checks.append(_psi_check(name, version, window.outputs, spec.max_prediction_psi))
    return checks


def _quality_checks(spec: GuardSpec, subject: Subject, window: QualityWindow) -> list[Check]:
    """``min_quality``: each metric's lower confidence bound (upper where lower is better)
    against its floor (ceiling); ``max_quality_drop_vs_baseline``: the upper confidence bound on
    the drop against the threshold. No verdict before ``min_labels`` labels (the baseline's too)."""
    version = subject.version
    checks: list[Check] = []
    for metric, floor in spec.min_quality:
        guard = f"min_quality.{metric}"
        figure = window.figures.get(metric)
        higher = QUALITY_METRICS[metric]
        detail: dict[str, Any] = {"labels": window.labels, "min_labels": spec.min_labels}
        if window.labels < spec.min_labels:
            checks.append(Check(guard, version, "insufficient", None, floor, detail))
            continue
        if figure is None:
            checks.append(_skipped(guard, version, floor, f"{metric} is not a figure of its task"))
            continue
        bound = figure.low if higher else figure.high
        detail |= {
            "metric": metric,
            "value": figure.value,
            "n": figure.n,
            "bound": "lower" if higher else "upper",
            "confidence": spec.confidence,
        }
        if bound is None:  # undefined yet (no positive label for recall, ...)
            checks.append(Check(guard, version, "insufficient", None, floor, detail))
            continue
        breached = bound < floor if higher else bound > floor
        checks.append(Check(guard, version, "breach" if breached else "pass", bound, floor, detail))
    for metric, limit in spec.max_quality_drop_vs_baseline:
        guard = f"max_quality_drop_vs_baseline.{metric}"
        if subject.baseline is None:
            checks.append(_skipped(guard, version, limit, "no baseline to compare with"))
            continue
        labels = min(window.labels, window.baseline_labels)
        detail = {
            "labels": window.labels,
            "baseline": subject.baseline,
            "baseline_labels": window.baseline_labels,
            "min_labels": spec.min_labels,
        }
        if labels < spec.min_labels:
            checks.append(Check(guard, version, "insufficient", None, limit, detail))
            continue
        if metric not in window.drops:
            checks.append(_skipped(guard, version, limit, f"{metric} is not a figure of its task"))
            continue
        drop = window.drops[metric]
        detail |= {"metric": metric, "confidence": spec.confidence}
        if drop is None:
            checks.append(Check(guard, version, "insufficient", None, limit, detail))
            continue
        checks.append(_compare(guard, version, drop, limit, detail))
    return checks


def _psi_check(guard: str, version: str, columns: tuple[ColumnPsi, ...], limit: float) -> Check:
    """The worst PSI among columns whose drift is beyond sampling noise (PSI ≥ critical PSI)
    and whose window holds enough values; 0 when none is; breach at ≥ the limit."""
    if not columns:
        return _skipped(guard, version, limit, "no drift reference for this version")
    sufficient = [col for col in columns if col.sufficient]
    if not sufficient:
        why = {"reason": "too few values in the drift window"}
        return Check(guard, version, "insufficient", None, limit, why)
    significant = [col for col in sufficient if col.psi >= col.critical_psi]
    worst = max(significant, key=lambda col: col.psi, default=None)
    value = worst.psi if worst is not None else 0.0
    detail: dict[str, Any] = {
        "column": worst.name if worst else None,
        "columns_over": [col.name for col in significant if col.psi >= limit],
    }
    return Check(guard, version, "breach" if value >= limit else "pass", value, limit, detail)


def _shadow_check(spec: GuardSpec, shadow: str, window: ShadowWindow) -> Check:
    limit = spec.max_shadow_disagreement
    assert limit is not None
    name = "max_shadow_disagreement"
    if window.compared < spec.min_requests or window.rows == 0:
        return Check(name, shadow, "insufficient", None, limit, {"compared": window.compared})
    bound = ratio_lower_bound(window.disagreements, window.rows, spec.confidence)
    detail: dict[str, Any] = {
        "compared": window.compared,
        "rows": window.rows,
        "disagreements": window.disagreements,
        "disagreement_ratio": window.disagreements / window.rows,
        "lower_bound": bound,
        "confidence": spec.confidence,
    }
    return _compare(name, shadow, bound, limit, detail)


def _compare(
    guard: str, version: str, value: float, threshold: float, detail: Mapping[str, Any]
) -> Check:
    status: CheckStatus = "breach" if value > threshold else "pass"
    return Check(guard, version, status, value, threshold, detail)


def _skipped(guard: str, version: str, threshold: float, why: str) -> Check:
    return Check(guard, version, "skipped", None, threshold, {"reason": why})


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Plan:
    """A policy change to apply: ``action`` names it in the audit trail, ``guard`` is the
    condition that led to it (the audit's ``who`` is ``guard:<guard>``)."""

    action: str  # rollback, switch, drop_arm, drop_shadow, advance, promote
    doc: PolicyDoc
    guard: str
    reason: str


def plan(
    doc: PolicyDoc,
    spec: GuardSpec,
    evaluation: Evaluation,
    *,
    healthy_for_s: float = 0.0,
    last_change_by_guard: bool = False,
) -> Plan | None:
    """The change an evaluation leads to, or None.

    On breach (``on_breach: rollback``) the strategy decides (``PolicyDoc.without``): canary
    rolls back; blue_green switches back, unless the last change was already a guard's (no
    flapping between two bad versions); ab sets the breaching arms' weights to 0 and
    renormalises the others; bandit removes the breaching arms (one left: single); never below
    one serving version. Shadow versions that breach leave the ``shadow`` list in the same
    change. On ``pass`` held for ``advance_after_s`` (``healthy_for_s``), an unpaused canary
    advances one step; past the last it promotes.
    """
    if evaluation.verdict == "pass":
        if not isinstance(doc, CanaryDoc) or spec.advance_after_s is None or doc.paused:
            return None
        if healthy_for_s < spec.advance_after_s:
            return None
        after = doc.apply("advance")
        target = f"weight {after.weight:g}" if isinstance(after, CanaryDoc) else "promotion"
        reason = (
            f"healthy for {healthy_for_s:.1f} s (advance_after_s {spec.advance_after_s:g}): "
            f"weight {doc.weight:g} -> {target}"
        )
        step = "advance" if isinstance(after, CanaryDoc) else "promote"
        return Plan(step, after, "advance_after_s", reason)
    if evaluation.verdict != "breach" or spec.on_breach != "rollback":
        return None
    breaches = evaluation.breaches
    bad = {c.version for c in breaches if c.guard != "max_shadow_disagreement"}
    bad_shadows = {c.version for c in breaches if c.guard == "max_shadow_disagreement"}
    action, after = doc.without(bad, last_change_by_guard)
    shadow = after.shadow
    if shadow is not None and bad_shadows & set(shadow.versions):
        kept = tuple(v for v in shadow.versions if v not in bad_shadows)
        after = after.with_shadow(ShadowSpec(kept, shadow.sample) if kept else None)
        action = action or "drop_shadow"
    if action is None:
        return None
    by_shadow = action == "drop_shadow"
    cause = next(c for c in breaches if (c.guard == "max_shadow_disagreement") == by_shadow)
    reason = "; ".join(c.describe() for c in breaches)
    return Plan(action, after, cause.guard, reason)
