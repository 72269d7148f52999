"""Plain counters the request path and the background tasks bump, read by the metrics collector
(gateway.http.metrics) and the fleet exchange (gateway.background.fleet) at their own pace."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.serving.statistics import Figures
from monitors.export import MonitorCounts

# The model label of a request for a name the registry does not know: label values come from the
# repository only, so no client can add series to the metrics or keys to these counters.
UNKNOWN_MODEL = "_unknown"
# What the request counter records for a client that left before sending its whole body
# (nginx's "client closed request"): not a failure of the gateway.
CLIENT_CLOSED = "499"


class Traffic:
    """Request counts by (model, version, role, code), in-flight requests by model, and the 504s
    of requests whose client chose a deadline below the guards' floor, by (model, version).
    Every key is a name from the registry (or ``UNKNOWN_MODEL``) or a fixed value."""

    __slots__ = ("client_timeouts", "inflight", "requests")

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        self.inflight: Counter[str] = Counter()
        self.client_timeouts: Counter[tuple[str, str]] = Counter()


def judged(role: str, code: str) -> bool:
    """Whether a request counts for a rollout guard: the policy routed it (not pinned to a
    version by the client, not the default route) and its outcome says something about the
    version (2xx, or a 5xx: not a client error, not a client that left)."""
    return role not in _UNROUTED and code[0] in "25"


_UNROUTED = frozenset({"pinned", "default", "unknown", "limited"})


@dataclass(slots=True)
class View:
    """Counters of one scope (a process, its process group, the fleet): requests by (model,
    version, role, code), in-flight requests by model, monitor counts and runtime statistics by
    (model, version)."""

    requests: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    inflight: Counter[str] = field(default_factory=Counter)
    monitors: dict[tuple[str, str], MonitorCounts] = field(default_factory=dict)
    members: int = 1
    # each version's runtime statistics (gateway.serving.statistics), added up over the members
    runtimes: dict[tuple[str, str], Figures] = field(default_factory=dict)

    def add_runtime(self, key: tuple[str, str], figures: Figures) -> None:
        current = self.runtimes.get(key)
        self.runtimes[key] = figures if current is None else current.merge(figures)

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
