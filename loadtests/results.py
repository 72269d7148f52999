"""What one benchmark run collects, and the medians quoted from its repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtests.floor import Floor
from loadtests.wrk import WrkPoint

MODELS = ("fraud", "heavy")
CONFIGS = ("turnout", "turnout-monitors", "turnout+canary", "turnout+shadow", "bare")
LABELS = {
    "turnout": "Turnout, no policy",
    "turnout-monitors": "Turnout, no policy, monitors off",
    "turnout+canary": "Turnout + canary policy",
    "turnout+shadow": "Turnout + shadow version",
    "bare": "bare starlette + onnxruntime",
}


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over the successful repeats; ``errors`` is their total; ``spread`` is
    (max - min) / median of the request rate."""

    runs: int
    failed: int
    rps: float
    spread: float
    p50_us: float
    p99_us: float
    p999_us: float
    server_cpu: float
    server_us_per_request: float
    client_cpu: float
    other_cpu: float
    errors: int
    failure: str = ""
    first_error: str = ""

    @property
    def ok(self) -> bool:
        return self.runs > 0


def _median(points: Sequence[WrkPoint], value: Callable[[WrkPoint], float]) -> float:
    values = [v for v in map(value, points) if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarize(points: Sequence[WrkPoint]) -> Summary:
    good = [p for p in points if not p.error]
    bad = [p for p in points if p.error]
    failure = bad[-1].error if bad else ("not run" if not points else "")
    nan = float("nan")
    if not good:
        return Summary(0, len(bad), nan, nan, nan, nan, nan, nan, nan, nan, nan, 0, failure)
    rps = [p.rps for p in good]
    median_rps = statistics.median(rps)
    return Summary(
        runs=len(good),
        failed=len(bad),
        rps=median_rps,
        spread=(max(rps) - min(rps)) / median_rps if median_rps > 0 else nan,
        p50_us=_median(good, lambda p: p.p50_us),
        p99_us=_median(good, lambda p: p.p99_us),
        p999_us=_median(good, lambda p: p.p999_us),
        server_cpu=_median(good, lambda p: p.server_cpu),
        server_us_per_request=_median(good, lambda p: p.server_cpu_us_per_request),
        client_cpu=_median(good, lambda p: p.client_cpu),
        other_cpu=_median(good, lambda p: p.other_cpu),
        errors=sum(p.errors for p in good),
        failure=failure,
        first_error=next((p.first_error for p in good if p.first_error), ""),
    )


@dataclass(slots=True)
class Results:
    """Filled in by loadtests.run as the run goes; every failure is kept as text."""

    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    closed: dict[tuple[str, str, int], list[WrkPoint]] = field(default_factory=dict)
    open: dict[tuple[str, str, float], list[WrkPoint]] = field(default_factory=dict)
    floors: dict[str, Floor] = field(default_factory=dict)
    starts: dict[str, list[float]] = field(default_factory=dict)
    # loadtests.handler_cost: µs per request in-process, one figure per round, by configuration
    handler: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def closed_summary(self, model: str, config: str, connections: int) -> Summary:
        return summarize(self.closed.get((model, config, connections), []))

    def open_rates(self, model: str) -> list[float]:
        return sorted({rate for (m, _, rate) in self.open if m == model})

    def open_summary(self, model: str, config: str, rate: float) -> Summary:
        return summarize(self.open.get((model, config, rate), []))

    def closed_max_rps(self, model: str, config: str) -> float:
        """The best median request rate of a configuration over its connection counts."""
        rates = [
            s.rps
            for (m, c, n) in self.closed
            if m == model and c == config and (s := self.closed_summary(m, c, n)).ok
        ]
        return max(rates, default=float("nan"))

    def composed_floor(self) -> tuple[float, float, float]:
        """(t_http s, t_sample s, requests/s) for the heavy model: t_http is the bare handler's
        time per request at one connection (its median latency, which shrugs off the stalls a
        shared machine adds to the mean) minus its batch-1 ``session.run``; t_sample is the
        per-sample time at the best batch size; the floor is 1 / (t_http + t_sample)."""
        nan = float("nan")
        floor = self.floors.get("heavy")
        bare = self.closed_summary("heavy", "bare", 1)
        if floor is None or not bare.ok:
            return nan, nan, nan
        t_http = (bare.p50_us - floor.batch1_us) / 1e6
        t_sample = floor.best[1] / 1e6
        if t_http <= 0:  # the floor was measured slower than a whole request: noise, no floor
            return t_http, t_sample, nan
        return t_http, t_sample, 1.0 / (t_http + t_sample)
