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

    @classmethod
    def parse(cls, raw: Any) -> GuardSpec:
        """Validate a guards object; PolicyError names the field (``guards.window_s``).
        Independent of the strategy, so every action keeps the document valid: a condition
        that does not apply to a strategy is skipped when evaluated."""
        if not isinstance(raw, Mapping):
            raise PolicyError("guards", 'must be an object, e.g. {"max_error_ratio": 0.01}')
        unknown = [k for k in raw if k not in SETTINGS and k not in CONDITIONS]
        if unknown:
            allowed = ", ".join((*SETTINGS, *CONDITIONS))
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
        return doc | self.thresholds()

    def thresholds(self) -> dict[str, float]:
        """The configured conditions: name -> threshold."""
        values = {name: getattr(self, name) for name in CONDITIONS}
        return {name: value for name, value in values.items() if value is not None}
