"""Write Turnout's Prometheus rules: SLO burn rates, burn-rate alerts, drift, shadow, liveness,
clients (the model-extraction signal), quality (labels joined to predictions) and the event
stream.

    python deploy/prometheus/generate_rules.py > deploy/prometheus/rules/turnout.rules.yml

The committed rule file is this script's output with default arguments (a test checks), so
change a target here, never in the YAML. Standard library only: it runs wherever Prometheus'
configuration is built.

SLO alerts follow the Google SRE workbook ("Alerting on SLOs", multiwindow, multi-burn-rate):
an alert fires when the error budget burns faster than ``factor`` times the sustainable rate over
both a long and a short window; the short window makes the alert stop soon after the problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

# Must equal gateway.http.metrics.LATENCY_BUCKETS (a test checks): a latency threshold only works at
# a bucket bound, and the gateway writes each bound's ``le`` label as Python's ``str(float)``.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BUDGET_PERIOD_HOURS = 30 * 24
DURATION_HOURS = {"m": 1 / 60, "h": 1.0, "d": 24.0}

Severity = Literal["page", "ticket", "warning"]
Yaml = dict[str, "Yaml"] | list["Yaml"] | str


@dataclass(frozen=True, slots=True)
class BurnWindow:
    """One alerting pair: burn faster than ``factor`` over ``long`` and over ``short``."""

    long: str
    short: str
    factor: Decimal
    severity: Severity
    for_: str

    @property
    def budget_share(self) -> float:
        """Share of the 30-day error budget spent over ``long`` at exactly ``factor``."""
        hours = int(self.long[:-1]) * DURATION_HOURS[self.long[-1]]
        return float(self.factor) * hours / BUDGET_PERIOD_HOURS


WINDOWS = (
    BurnWindow("1h", "5m", Decimal("14.4"), "page", "2m"),
    BurnWindow("6h", "30m", Decimal("6"), "page", "15m"),
    BurnWindow("3d", "6h", Decimal("1"), "ticket", "1h"),
)
RATE_WINDOWS = ("5m", "30m", "1h", "6h", "3d")
# Quality metrics whose lower bound a floor is judged on (router.policy.guard_spec.QUALITY_METRICS)
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "roc_auc", "macro_recall")


@dataclass(frozen=True, slots=True)
class Targets:
    """Everything the generated rules depend on; the defaults produce the committed file."""

    availability: Decimal = Decimal("0.999")
    latency_target: Decimal = Decimal("0.99")
    latency_threshold: float = 0.025
    shadow_disagreement: Decimal = Decimal("0.05")
    job: str = "turnout"
    runbook: str = "docs/operations.md"
    # TurnoutQualityBelowFloor: the lower confidence bound of this metric (one where higher is
    # better) under the floor, once a version has this many labels in the quality window
    quality_metric: str = "recall"
    quality_floor: Decimal = Decimal("0.5")
    quality_min_labels: int = 100
    # TurnoutOutcomesUnknown: the share of posted outcomes that join no prediction
    outcomes_unknown: Decimal = Decimal("0.2")

    def __post_init__(self) -> None:
        for name in ("availability", "latency_target"):
            value = getattr(self, name)
            if not Decimal(0) < value < Decimal(1):
                raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
        if self.latency_threshold not in LATENCY_BUCKETS:
            raise ValueError(
                f"latency threshold {self.latency_threshold} s is not a bucket bound of "
                f"turnout_request_duration_seconds; choose one of {list(LATENCY_BUCKETS)}"
            )
        if self.quality_metric not in HIGHER_IS_BETTER:
            raise ValueError(
                f"quality metric must be one of {', '.join(HIGHER_IS_BETTER)} (higher is "
                f"better), got {self.quality_metric!r}"
            )
        for name in ("quality_floor", "outcomes_unknown"):
            if not Decimal(0) < getattr(self, name) < Decimal(1):
                raise ValueError(f"{name} must be strictly between 0 and 1")
        if self.quality_min_labels < 1:
            raise ValueError("quality min labels must be positive")
        if not Decimal(0) < self.shadow_disagreement <= Decimal(1):
            raise ValueError(
                f"shadow disagreement must be in (0, 1], got {self.shadow_disagreement}"
            )


@dataclass(frozen=True, slots=True)
class Slo:
    name: Literal["availability", "latency"]
    budget: Decimal  # allowed share of bad requests
    bad: str  # what counts as bad, for humans
    objective: str

    def ratio(self, window: str, threshold: float) -> str:
        """PromQL: share of bad requests per model over ``window``."""
        if self.name == "availability":
            # 429 is the gateway's own queue overflowing: the user sees a failure. A client held
            # to its own rate limit (role "limited") is neither an error nor service owed.
            served = 'turnout_requests_total{role!="limited"}'
            total = f"sum by (model) (rate({served}[{window}]))"
            errors = (
                "sum by (model) (rate(turnout_requests_total"
                f'{{code=~"5..|429", role!="limited"}}[{window}]))'
            )
            # `or 0 * total` keeps a 0 where no error exists, instead of no series at all.
            return f"(\n  {errors}\n  or\n  0 * {total}\n)\n/\n{total}"
        fast = f'turnout_request_duration_seconds_bucket{{le="{threshold}"}}'
        count = f"turnout_request_duration_seconds_count[{window}]"
        return f"1 -\nsum by (model) (rate({fast}[{window}]))\n/\nsum by (model) (rate({count}))"


def slos(targets: Targets) -> tuple[Slo, ...]:
    threshold_ms = f"{Decimal(str(targets.latency_threshold)) * 1000:f}".rstrip("0").rstrip(".")
    return (
        Slo(
            "availability",
            1 - targets.availability,
            "5xx and 429 responses",
            f"{_percent(targets.availability)} of requests answered without a 5xx or 429",
        ),
        Slo(
            "latency",
            1 - targets.latency_target,
            f"requests slower than {threshold_ms} ms",
            f"{_percent(targets.latency_target)} of successful requests within {threshold_ms} ms",
        ),
    )


def burn_name(window: str) -> str:
    return f"model:turnout_slo_burn:rate{window}"


def recording_rules(targets: Targets) -> list[Yaml]:
    rules: list[Yaml] = []
    for slo in slos(targets):
        for window in RATE_WINDOWS:
            ratio = slo.ratio(window, targets.latency_threshold)
            rules.append(
                {
                    "record": burn_name(window),
                    "labels": {"slo": slo.name},
                    "expr": f"(\n  {_indent(ratio)}\n)\n/ {slo.budget}",
                }
            )
    return rules


def burn_alerts(targets: Targets) -> list[Yaml]:
    alerts: list[Yaml] = []
    for slo in slos(targets):
        title = slo.name.capitalize()
        selector = f'{{slo="{slo.name}"}}'
        for w in WINDOWS:
            alerts.append(
                _alert(
                    f"Turnout{title}Burn{w.long}",
                    f"{burn_name(w.long)}{selector} > {w.factor}\n"
                    f"and\n{burn_name(w.short)}{selector} > {w.factor}",
                    w.for_,
                    w.severity,
                    f"{{{{ $labels.model }}}}: {slo.name} budget burn above {w.factor}x "
                    f"over {w.long}",
                    f"{slo.bad.capitalize()} are spending the error budget of the {slo.name} SLO "
                    f'({slo.objective}) at {{{{ $value | printf "%.1f" }}}}x the sustainable '
                    f"rate over the last {w.long}, and above {w.factor}x over the last {w.short}. "
                    f"At {w.factor}x, {w.long} spends {w.budget_share * 100:.0f}% of a 30-day "
                    "budget.",
                    f"{targets.runbook}#turnout-{slo.name}-burn",
                )
            )
    return alerts


def drift_alerts(targets: Targets) -> list[Yaml]:
    return [
        _alert(
            "TurnoutFeatureDrift",
            "turnout_feature_drift_status == 3",
            "15m",
            "warning",
            "{{ $labels.model }} v{{ $labels.version }}: input feature {{ $labels.feature }} "
            "drifted",
            "The PSI of feature {{ $labels.feature }} against the version's reference has been at "
            "the act level (>= 0.25 and beyond sampling noise) for 15 minutes.",
            f"{targets.runbook}#turnout-feature-drift",
        ),
        _alert(
            "TurnoutPredictionDrift",
            "turnout_prediction_drift_status == 3",
            "15m",
            "warning",
            "{{ $labels.model }} v{{ $labels.version }}: output {{ $labels.output }} drifted",
            "The PSI of output {{ $labels.output }} against the outputs on the reference sample "
            "has been at the act level (>= 0.25 and beyond sampling noise) for 15 minutes.",
            f"{targets.runbook}#turnout-prediction-drift",
        ),
        _alert(
            "TurnoutShadowDisagreement",
            # The ratio is cumulative since the gateway loaded the pair: only alert while the
            # shadow still receives copies, so a finished shadow does not fire forever.
            f"turnout_shadow_disagreement_ratio > {targets.shadow_disagreement}\n"
            "and on (model, version, shadow)\n"
            "rate(turnout_shadow_requests_total[10m]) > 0",
            "10m",
            "warning",
            "{{ $labels.model }}: shadow v{{ $labels.shadow }} disagrees with "
            "v{{ $labels.version }}",
            "Shadow version {{ $labels.shadow }} decides differently from primary version "
            "{{ $labels.version }} on {{ $value | humanizePercentage }} of rows (threshold "
            f"{_percent(targets.shadow_disagreement)}) for 10 minutes.",
            f"{targets.runbook}#turnout-shadow-disagreement",
        ),
        _alert(
            "TurnoutMonitorSkipping",
            "sum by (model, version) (increase(turnout_monitor_skipped_total[10m])) > 0",
            "10m",
            "warning",
            "{{ $labels.model }} v{{ $labels.version }}: drift monitor skips requests",
            "The monitor of {{ $labels.model }} version {{ $labels.version }} has skipped "
            "requests whose tensors do not have its reference sample's columns for 10 minutes: "
            "drift and latency for them are not measured.",
            f"{targets.runbook}#turnout-monitor-skipping",
        ),
    ]


def liveness_alerts(targets: Targets) -> list[Yaml]:
    up = f'up{{job="{targets.job}"}}'
    return [
        _alert(
            "TurnoutDown",
            # absent(... == 1) also fires when service discovery finds no target at all.
            f"absent({up} == 1)",
            "2m",
            "page",
            "No Turnout gateway is up",
            f"Prometheus has scraped no healthy target of job {targets.job} for 2 minutes.",
            f"{targets.runbook}#turnout-down",
            {"job": targets.job},  # absent() of a comparison keeps no label
        ),
        _alert(
            "TurnoutInstanceDown",
            f"{up} == 0",
            "5m",
            "ticket",
            "Turnout gateway {{ $labels.instance }} is down",
            "Prometheus has failed to scrape {{ $labels.instance }} for 5 minutes; the other "
            "gateways carry its traffic.",
            f"{targets.runbook}#turnout-down",
        ),
        _alert(
            "TurnoutNoTraffic",
            "sum by (model) (rate(turnout_requests_total[15m])) == 0\n"
            "and\nsum by (model) (rate(turnout_requests_total[1h] offset 1h)) > 0",
            "5m",
            "warning",
            "{{ $labels.model }}: no inference requests",
            "Model {{ $labels.model }} answered requests an hour ago but none in the last 15 "
            "minutes: check its clients and whatever routes traffic to Turnout.",
            f"{targets.runbook}#turnout-no-traffic",
        ),
        _alert(
            "TurnoutStateStoreReset",
            "increase(turnout_store_resets_total[10m]) > 0",
            "0m",
            "ticket",
            "Turnout's state store lost its state",
            "Gateway {{ $labels.instance }} found the shared state store (Redis) behind the "
            "policies it had seen and put its copy back: routing goes on as before, but the audit "
            "trail before the reset, feedback assignments and most statistics are gone.",
            f"{targets.runbook}#turnout-state-store-reset",
        ),
    ]


# The extraction signal (gateway.http.clients; docs/operations.md#turnout-client-extraction).
# In-distribution traffic puts a row outside a reference sample's [min, max] on one of k features
# with probability about 2k / (n + 1) for n reference rows: a few percent for the demo's 32
# features and 1,000 rows. A client above half is not sampling the data the model was made for.
CLIENT_OUTSIDE_SHARE = Decimal("0.5")
CLIENT_VOLUME_RATIO = 5
CLIENT_MIN_RATE = Decimal("0.1")  # requests/s below which neither signal alerts


def client_alerts(targets: Targets) -> list[Yaml]:
    checked = "sum by (client) (rate(turnout_client_inputs_checked_total[30m]))"
    return [
        _alert(
            "TurnoutClientInputsOutsideReference",
            "sum by (client) (rate(turnout_client_inputs_outside_total[30m]))\n"
            f"/\n{checked}\n> {CLIENT_OUTSIDE_SHARE}\n"
            f"and\n{checked} > {CLIENT_MIN_RATE}",
            "15m",
            "warning",
            "client {{ $labels.client }}: most inputs outside the reference range",
            "{{ $value | humanizePercentage }} of client {{ $labels.client }}'s requests over 30 "
            "minutes had a feature outside the range of the model's reference sample (threshold "
            f"{_percent(CLIENT_OUTSIDE_SHARE)}): synthetic probing, as a model-extraction attack "
            "sends, or a client feeding data the model was not made for.",
            f"{targets.runbook}#turnout-client-extraction",
        ),
        _alert(
            "TurnoutClientVolumeSurge",
            f"max by (client) (turnout_client_volume_ratio) > {CLIENT_VOLUME_RATIO}\n"
            "and\nsum by (client) (rate(turnout_client_requests_total[5m])) > "
            f"{CLIENT_MIN_RATE}",
            "15m",
            "warning",
            "client {{ $labels.client }}: query volume {{ $value | humanize }}x its own history",
            "Client {{ $labels.client }}'s request rate over the last 5 minutes has been more than "
            f"{CLIENT_VOLUME_RATIO} times its rate over the last hour for 15 minutes.",
            f"{targets.runbook}#turnout-client-extraction",
        ),
    ]


def quality_alerts(targets: Targets) -> list[Yaml]:
    """Quality from the outcome join (gateway.background.quality). The figures are the fleet's,
    the same on every replica: ``min by`` collapses the replicas."""
    metric = targets.quality_metric
    posted = "sum by (model) (rate(turnout_outcomes_total[30m]))"
    return [
        _alert(
            "TurnoutQualityBelowFloor",
            f'min by (model, version) (turnout_quality_lower_bound{{metric="{metric}"}})\n'
            f"< {targets.quality_floor}\n"
            "and on (model, version)\n"
            f"min by (model, version) (turnout_quality_labels) >= {targets.quality_min_labels}",
            "30m",
            "ticket",
            f"{{{{ $labels.model }}}} v{{{{ $labels.version }}}}: {metric} below "
            f"{targets.quality_floor}",
            f"The lower 95% confidence bound of the {metric} of {{{{ $labels.model }}}} version "
            "{{ $labels.version }}, from the outcomes joined to its predictions over the quality "
            f'window, has been {{{{ $value | printf "%.3f" }}}}, under the floor of '
            f"{targets.quality_floor}, for 30 minutes.",
            f"{targets.runbook}#turnout-quality-below-floor",
        ),
        _alert(
            "TurnoutOutcomesUnknown",
            'sum by (model) (rate(turnout_outcomes_total{result=~"unknown|expired"}[30m]))\n'
            f"/\n{posted}\n> {targets.outcomes_unknown}\nand\n{posted} > 0",
            "15m",
            "warning",
            "{{ $labels.model }}: outcomes join no prediction",
            "{{ $value | humanizePercentage }} of the outcomes posted for {{ $labels.model }} "
            "over 30 minutes were for unknown or expired inference ids (threshold "
            f"{_percent(targets.outcomes_unknown)}): clients without ids, labels later than "
            "the horizon, or a join too small for it.",
            f"{targets.runbook}#turnout-outcomes-unknown",
        ),
        _alert(
            "TurnoutOutcomeJoinEvicting",
            "increase(turnout_outcome_join_evictions_total[30m]) > 0",
            "0m",
            "ticket",
            "Gateway {{ $labels.instance }}: the outcome join evicts predictions",
            "The in-process outcome join of {{ $labels.instance }} let predictions go before "
            "their horizon ({{ $labels.reason }} cap): their outcomes will be unknown. Raise "
            "--outcome-max-entries / --outcome-max-bytes, or use Redis.",
            f"{targets.runbook}#turnout-outcomes-unknown",
        ),
    ]


# The event stream (gateway.background.events; docs/events.md). A sink that has not taken its
# oldest event for this long is down, refusing, or too slow for the events emitted.
EVENT_STUCK_MINUTES = 15


def event_alerts(targets: Targets) -> list[Yaml]:
    return [
        _alert(
            "TurnoutEventOutboxStuck",
            f"max by (sink) (turnout_event_outbox_oldest_age_seconds) > {EVENT_STUCK_MINUTES * 60}",
            "5m",
            "ticket",
            "event sink {{ $labels.sink }}: undelivered for {{ $value | humanizeDuration }}",
            "The oldest event waiting for sink {{ $labels.sink }} was emitted more than "
            f"{EVENT_STUCK_MINUTES} minutes ago: the sink is down, answers errors, or cannot keep "
            "up. Events wait in the outbox (nothing is lost until it is full).",
            f"{targets.runbook}#turnout-event-outbox-stuck",
        ),
        _alert(
            "TurnoutEventsDropped",
            "sum by (reason) (increase(turnout_events_dropped_total[15m])) > 0",
            "0m",
            "ticket",
            "events dropped ({{ $labels.reason }})",
            "Events were dropped in the last 15 minutes for {{ $labels.reason }}: they reach no "
            "sink and no listing. outbox_full: the outbox is full of events a sink has not taken.",
            f"{targets.runbook}#turnout-events-dropped",
        ),
        _alert(
            "TurnoutEventSinkRefusing",
            'sum by (sink) (increase(turnout_event_deliveries_total{outcome="poisoned"}[15m])) > 0',
            "0m",
            "ticket",
            "event sink {{ $labels.sink }} refuses events",
            "Sink {{ $labels.sink }} answered a 4xx to events until the gateway skipped them "
            "(poison_attempts) in the last 15 minutes: the sink never got them, and the outbox "
            "does not look stuck. A wrong secret, a clock off by more than 5 minutes, or a "
            "receiver that does not know an event kind.",
            f"{targets.runbook}#turnout-event-sink-refusing",
        ),
    ]


# Rollout templates (gateway.background.rollout; docs/rollouts.md). A rollout that waits for a
# person longer than this holds its candidate at its last step: someone should decide.
APPROVAL_PENDING_HOURS = 4


def rollout_alerts(targets: Targets) -> list[Yaml]:
    return [
        _alert(
            "TurnoutRolloutApprovalPending",
            "max by (model) (turnout_rollout_approvals_pending) > 0",
            f"{APPROVAL_PENDING_HOURS}h",
            "ticket",
            "{{ $labels.model }}: a rollout waits for approval",
            "The rollout of {{ $labels.model }} has waited for an operator's approve or reject "
            f"for {APPROVAL_PENDING_HOURS} hours; its candidate holds at its step meanwhile.",
            f"{targets.runbook}#turnout-rollout-approval-pending",
        ),
    ]


def rules(targets: Targets) -> Yaml:
    return {
        "groups": [
            {"name": "turnout-slo-burn-rates", "rules": recording_rules(targets)},
            {"name": "turnout-slo-alerts", "rules": burn_alerts(targets)},
            {"name": "turnout-model-alerts", "rules": drift_alerts(targets)},
            {"name": "turnout-liveness-alerts", "rules": liveness_alerts(targets)},
            {"name": "turnout-client-alerts", "rules": client_alerts(targets)},
            {"name": "turnout-quality-alerts", "rules": quality_alerts(targets)},
            {"name": "turnout-event-alerts", "rules": event_alerts(targets)},
            {"name": "turnout-rollout-alerts", "rules": rollout_alerts(targets)},
        ]
    }


def render(targets: Targets) -> str:
    header = [
        "# Generated by deploy/prometheus/generate_rules.py: edit the script, not this file.",
        f"# Availability SLO {targets.availability}, latency SLO {targets.latency_target} "
        f"within {targets.latency_threshold} s, 30-day error budget.",
    ]
    return "\n".join([*header, *_dump(rules(targets), 0)]) + "\n"


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: Severity,
    summary: str,
    description: str,
    runbook: str,
    labels: dict[str, Yaml] | None = None,
) -> Yaml:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, **(labels or {})},
        "annotations": {"summary": summary, "description": description, "runbook_url": runbook},
    }


def _percent(share: Decimal) -> str:
    return f"{(share * 100).normalize():f}%"


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


_PLAIN = re.compile(r"[A-Za-z][\w.:/#-]*|\d+[smhd]")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _scalar(text: str) -> str:
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(text, ensure_ascii=False)


def _dump(value: Yaml, depth: int) -> list[str]:
    """Block-style YAML lines for mappings, sequences of mappings, and strings."""
    pad = "  " * depth
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and (key == "expr" or "\n" in item):
                lines.append(f"{pad}{key}: |-")
                lines.extend(f"{pad}  {line}" if line else "" for line in item.split("\n"))
            elif isinstance(item, str):
                lines.append(f"{pad}{key}: {_scalar(item)}")
            else:
                lines.append(f"{pad}{key}:")
                lines.extend(_dump(item, depth + 1))
    elif isinstance(value, list):
        for item in value:
            nested = _dump(item, depth + 1)
            lines.append(f"{pad}- {nested[0].lstrip()}")
            lines.extend(nested[1:])
    else:
        raise TypeError(f"only mappings and sequences nest here, got {value!r}")
    return lines


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = Targets()
    add = parser.add_argument
    add("--availability", type=_decimal, default=defaults.availability,
        help="share of requests without a 5xx or 429 (default %(default)s)")  # fmt: skip
    add("--latency-target", type=_decimal, default=defaults.latency_target,
        help="share of successful requests within the threshold (default %(default)s)")  # fmt: skip
    add("--latency-threshold", type=float, default=defaults.latency_threshold,
        help="seconds; a bucket bound of the gateway (default %(default)s)")  # fmt: skip
    add("--shadow-disagreement", type=_decimal, default=defaults.shadow_disagreement,
        help="alert above this shadow disagreement ratio (default %(default)s)")  # fmt: skip
    add("--quality-metric", default=defaults.quality_metric,
        help="TurnoutQualityBelowFloor's metric (default %(default)s)")  # fmt: skip
    add("--quality-floor", type=_decimal, default=defaults.quality_floor,
        help="alert when the metric's lower bound is under this (default %(default)s)")  # fmt: skip
    add("--quality-min-labels", type=int, default=defaults.quality_min_labels,
        help="labels a version needs before the floor applies (default %(default)s)")  # fmt: skip
    add("--outcomes-unknown", type=_decimal, default=defaults.outcomes_unknown,
        help="alert above this share of unknown outcomes (default %(default)s)")  # fmt: skip
    add("--job", default=defaults.job, help="scrape job name (default %(default)s)")
    add("--runbook", default=defaults.runbook,
        help="runbook URL without anchor (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        targets = Targets(
            args.availability,
            args.latency_target,
            args.latency_threshold,
            args.shadow_disagreement,
            args.job,
            args.runbook,
            quality_metric=args.quality_metric,
            quality_floor=args.quality_floor,
            quality_min_labels=args.quality_min_labels,
            outcomes_unknown=args.outcomes_unknown,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(render(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
