"""Plain counters the request path and the background tasks bump, read by the metrics collector
(gateway.http.metrics) and the fleet exchange (gateway.background.fleet) at their own pace."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from monitors.export import MonitorCounts


class Traffic:
    """Request counts by (model, version, role, code) and in-flight requests by model."""

    __slots__ = ("inflight", "requests")

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        self.inflight: Counter[str] = Counter()


@dataclass(slots=True)
class View:
    """Counters of one scope (a process, its process group, the fleet): requests by (model,
    version, role, code), in-flight requests by model, monitor counts by (model, version)."""

    requests: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    inflight: Counter[str] = field(default_factory=Counter)
    monitors: dict[tuple[str, str], MonitorCounts] = field(default_factory=dict)
    members: int = 1

    def add_monitor(self, key: tuple[str, str], counts: MonitorCounts) -> None:
        current = self.monitors.get(key)
        if current is None:
            self.monitors[key] = counts
        elif current.fingerprint == counts.fingerprint:
            self.monitors[key] = current.merge(counts)
        # else: another artifact or reference under the same name is not comparable: skipped


class GuardMetrics:
    """What the guard evaluator (gateway.background.guards) counts and measures, exported at scrape
    time. Values and thresholds are those of the latest evaluation by this replica while it
    leads."""

    __slots__ = ("actions", "evaluations", "leader", "requests", "thresholds", "values")

    def __init__(self) -> None:
        self.leader = False
        self.evaluations: Counter[tuple[str, str]] = Counter()  # (model, verdict)
        self.actions: Counter[tuple[str, str]] = Counter()  # (model, action)
        self.values: dict[tuple[str, str, str], float] = {}  # (model, version, guard)
        self.thresholds: dict[tuple[str, str], float] = {}  # (model, guard)
        self.requests: dict[tuple[str, str], int] = {}  # (model, version): in the window

    def forget(self, model: str) -> None:
        """Drop the model's gauges (its guards changed, or another replica evaluates now)."""
        self.values = {k: v for k, v in self.values.items() if k[0] != model}
        self.thresholds = {k: v for k, v in self.thresholds.items() if k[0] != model}
        self.requests = {k: v for k, v in self.requests.items() if k[0] != model}
