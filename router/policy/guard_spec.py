"""The ``guards`` object of a policy: its fields, defaults and bounds. Pure; router.policy.spec
validates documents with it and router.policy.guards judges windows by it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from router.policy.policies import PolicyError

OnBreach = Literal["rollback", "alert"]
# The conditions, in evaluation order; each compares one value with the threshold of its name.
CONDITIONS = (
    "max_error_ratio",
    "max_p99_ratio_to_baseline",
    "max_p99_s",
    "max_psi",
    "max_prediction_psi",
    "max_shadow_disagreement",
)
# The conditions that read the inline monitors (latency histograms, drift).
MONITORED = ("max_p99_ratio_to_baseline", "max_p99_s", "max_psi", "max_prediction_psi")
SETTINGS = ("window_s", "min_requests", "interval_s", "confidence", "on_breach", "advance_after_s")
# Quality conditions: objects of metric -> threshold, judged on the labels joined to each
# version's predictions (monitors.quality), once a version has ``min_labels`` of them.
QUALITY_CONDITIONS = ("min_quality", "max_quality_drop_vs_baseline")
QUALITY_SETTINGS = ("min_labels",)
# The metrics a quality condition may name (monitors.quality's figures that have a better
# direction), and whether higher is better; the check is the metric's, so a floor of a loss is
# a ceiling.
QUALITY_METRICS: dict[str, bool] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "false_positive_rate": False,
    "roc_auc": True,
    "brier": False,
    "log_loss": False,
    "macro_recall": True,
    "mae": False,
    "rmse": False,
}
# Metrics bounded by [0, 1]: their thresholds are too.
UNIT_METRICS = frozenset(
    ("accuracy", "precision", "recall", "false_positive_rate", "roc_auc", "brier", "macro_recall")
)
MAX_QUALITY_THRESHOLD = 1e15
DEFAULT_MIN_LABELS = 100


@dataclass(frozen=True, slots=True)
class GuardSpec:
    window_s: float = 60.0
    min_requests: int = 200
    interval_s: float = 2.0
    confidence: float = 0.95
    on_breach: OnBreach = "rollback"
    advance_after_s: float | None = None
    max_error_ratio: float | None = None
    max_p99_ratio_to_baseline: float | None = None
    max_p99_s: float | None = None
    max_psi: float | None = None
    max_prediction_psi: float | None = None
    max_shadow_disagreement: float | None = None
    # metric -> floor (a ceiling for metrics where lower is better), and metric -> the largest
    # drop against the baseline; pairs sorted by metric
    min_quality: tuple[tuple[str, float], ...] = ()
    max_quality_drop_vs_baseline: tuple[tuple[str, float], ...] = ()
    min_labels: int = DEFAULT_MIN_LABELS

    @classmethod
    def parse(cls, raw: Any) -> GuardSpec:
        """Validate a guards object; PolicyError names the field (``guards.window_s``).
        Independent of the strategy, so every action keeps the document valid: a condition
        that does not apply to a strategy is skipped when evaluated."""
        if not isinstance(raw, Mapping):
            raise PolicyError("guards", 'must be an object, e.g. {"max_error_ratio": 0.01}')
        known = (*SETTINGS, *QUALITY_SETTINGS, *CONDITIONS, *QUALITY_CONDITIONS)
        unknown = [k for k in raw if k not in known]
        if unknown:
            allowed = ", ".join(known)
            raise PolicyError(f"guards.{unknown[0]}", f"unknown field (allowed: {allowed})")
        on_breach = raw.get("on_breach", "rollback")
        if on_breach not in get_args(OnBreach):
            raise PolicyError(
                "guards.on_breach", f"must be one of {list(get_args(OnBreach))}, got {on_breach!r}"
            )
        min_requests = raw.get("min_requests", 200)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int):
            raise PolicyError("guards.min_requests", f"must be an integer, got {min_requests!r}")
        if not 1 <= min_requests <= 1_000_000_000:
            raise PolicyError("guards.min_requests", f"must be in [1, 1e9], got {min_requests}")

        def number(name: str, low: float, high: float, open_low: bool = False) -> float | None:
            if name not in raw:
                return None
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError(f"guards.{name}", f"must be a number, got {value!r}")
            if not (low < value if open_low else low <= value) or not value <= high:
                bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
                raise PolicyError(f"guards.{name}", f"must be in {bounds}, got {value!r}")
            return float(value)

        def setting(name: str, default: float, low: float, high: float) -> float:
            value = number(name, low, high)
            return default if value is None else value

        min_labels = raw.get("min_labels", DEFAULT_MIN_LABELS)
        if isinstance(min_labels, bool) or not isinstance(min_labels, int):
            raise PolicyError("guards.min_labels", f"must be an integer, got {min_labels!r}")
        if not 1 <= min_labels <= 1_000_000_000:
            raise PolicyError("guards.min_labels", f"must be in [1, 1e9], got {min_labels}")
        ratio_max = 1.0 - 1e-12  # a ratio bound of 1 could never be exceeded
        return cls(
            window_s=setting("window_s", 60.0, 1.0, 86_400.0),
            min_requests=min_requests,
            interval_s=setting("interval_s", 2.0, 0.5, 3_600.0),
            confidence=setting("confidence", 0.95, 0.5, 0.9999),
            on_breach=on_breach,
            advance_after_s=number("advance_after_s", 0.0, 7 * 86_400.0),
            max_error_ratio=number("max_error_ratio", 0.0, ratio_max),
            max_p99_ratio_to_baseline=number("max_p99_ratio_to_baseline", 0.0, 1e6, True),
            max_p99_s=number("max_p99_s", 0.0, 1e6, True),
            max_psi=number("max_psi", 0.0, 1e6, True),
            max_prediction_psi=number("max_prediction_psi", 0.0, 1e6, True),
            max_shadow_disagreement=number("max_shadow_disagreement", 0.0, ratio_max),
            min_quality=_metrics(raw, "min_quality"),
            max_quality_drop_vs_baseline=_metrics(raw, "max_quality_drop_vs_baseline"),
            min_labels=min_labels,
        )

    def as_doc(self) -> dict[str, Any]:
        """The normalised object stores keep: settings with defaults, conditions as given."""
        doc: dict[str, Any] = {
            "window_s": self.window_s,
            "min_requests": self.min_requests,
            "interval_s": self.interval_s,
            "confidence": self.confidence,
            "on_breach": self.on_breach,
        }
        if self.advance_after_s is not None:
            doc["advance_after_s"] = self.advance_after_s
        if self.min_quality or self.max_quality_drop_vs_baseline:
            doc["min_labels"] = self.min_labels
        values = {name: getattr(self, name) for name in CONDITIONS}
        doc |= {name: value for name, value in values.items() if value is not None}
        for name in QUALITY_CONDITIONS:
            pairs = getattr(self, name)
            if pairs:
                doc[name] = dict(pairs)
        return doc

    def thresholds(self) -> dict[str, float]:
        """The configured conditions: name -> threshold; a quality condition's metric is
        ``min_quality.recall``, as its checks and the audit's ``who`` name it."""
        values = {name: getattr(self, name) for name in CONDITIONS}
        out = {name: value for name, value in values.items() if value is not None}
        for name in QUALITY_CONDITIONS:
            out |= {f"{name}.{metric}": value for metric, value in getattr(self, name)}
        return out

    @property
    def judges_quality(self) -> bool:
        return bool(self.min_quality or self.max_quality_drop_vs_baseline)


def _metrics(raw: Mapping[str, Any], name: str) -> tuple[tuple[str, float], ...]:
    """A quality condition: an object of known metric names -> thresholds, sorted."""
    if name not in raw:
        return ()
    value = raw[name]
    if not isinstance(value, Mapping) or not value:
        raise PolicyError(
            f"guards.{name}", 'must be a non-empty object of metric -> number, e.g. {"recall": 0.8}'
        )
    out: list[tuple[str, float]] = []
    for metric, threshold in value.items():
        field = f"guards.{name}.{str(metric)[:40]}"
        if metric not in QUALITY_METRICS:
            raise PolicyError(field, f"unknown metric (one of {', '.join(QUALITY_METRICS)})")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise PolicyError(field, f"must be a number, got {str(threshold)[:40]!r}")
        high = 1.0 if metric in UNIT_METRICS else MAX_QUALITY_THRESHOLD
        if not 0.0 <= threshold <= high:
            raise PolicyError(field, f"must be in [0, {high:g}], got {threshold!r}")
        out.append((metric, float(threshold)))
    return tuple(sorted(out))
