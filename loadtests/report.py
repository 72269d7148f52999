"""docs/benchmarks.md and docs/benchmarks.png from a :class:`Results`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loadtests import handler_cost
from loadtests.results import CONFIGS, LABELS, MODELS, Results, Summary

SATURATED = 0.95  # achieved / offered below this: the server did not keep up

NAMES = {"fraud": "light model (`fraud`, 32 features)", "heavy": "heavy model (`heavy`, 256 → 10)"}


@dataclass(frozen=True, slots=True)
class Goal:
    """A ratio and the bound it must meet; ``value`` is NaN when it could not be measured."""

    name: str
    value: float
    bound: float
    sense: Literal["≥", "≤"]
    detail: str

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "not measured"
        met = self.value >= self.bound if self.sense == "≥" else self.value <= self.bound
        return "**met**" if met else "**missed**"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else float("nan")


def goals(r: Results) -> list[Goal]:
    """The ratios the project's goals name (issue "Performance"), with its bounds."""
    light_canary = r.closed_summary("fraud", "turnout+canary", 64)
    light_bare = r.closed_summary("fraud", "bare", 64)
    monitored = r.closed_summary("fraud", "turnout", 64)
    unmonitored = r.closed_summary("fraud", "turnout-monitors", 64)
    in_process = (
        handler_cost.paired_ratio(r.handler, "turnout", "turnout-monitors")
        if r.handler
        else float("nan")
    )
    heavy = r.closed_summary("heavy", "turnout", 64)
    heavy_bare = r.closed_summary("heavy", "bare", 64)
    one = r.closed_summary("fraud", "turnout", 1)
    one_bare = r.closed_summary("fraud", "bare", 1)
    _, _, floor_rps = r.composed_floor()
    shadow_on, shadow_off, where = _shadow_pair(r)
    cold, warm = r.starts.get("cold", []), r.starts.get("warm", [])
    cold_s = statistics.median(cold) if cold else float("nan")
    warm_s = statistics.median(warm) if warm else float("nan")
    return [
        Goal(
            "light, 64 conn: Turnout + canary + monitors req/s ÷ bare req/s",
            _ratio(light_canary.rps, light_bare.rps), 0.8, "≥",
            f"{_n(light_canary.rps)} vs {_n(light_bare.rps)} req/s",
        ),
        Goal(
            "light, 64 conn: Turnout + canary + monitors p99 ÷ bare p99",
            _ratio(light_canary.p99_us, light_bare.p99_us), 1.0, "≤",
            f"{_ms(light_canary.p99_us)} vs {_ms(light_bare.p99_us)} ms",
        ),
        Goal(
            "light, 64 conn: Turnout req/s, monitors on ÷ off (issue 4)",
            _ratio(monitored.rps, unmonitored.rps), 0.97, "≥",
            f"{_n(monitored.rps)} vs {_n(unmonitored.rps)} req/s",
        ),
        Goal(
            "in-process handler (no network): throughput, monitors on ÷ off (issue 4)",
            in_process, 0.97, "≥",
            "median over rounds of the paired ratio, see below",
        ),
        Goal(
            "heavy, 64 conn: Turnout req/s ÷ bare req/s",
            _ratio(heavy.rps, heavy_bare.rps), 2.0, "≥",
            f"{_n(heavy.rps)} vs {_n(heavy_bare.rps)} req/s",
        ),
        Goal(
            "heavy, 64 conn: Turnout req/s ÷ composed floor",
            _ratio(heavy.rps, floor_rps), 0.8, "≥",
            f"{_n(heavy.rps)} vs {_n(floor_rps)} req/s",
        ),
        Goal(
            "light, 1 conn: Turnout p50 ÷ bare p50",
            _ratio(one.p50_us, one_bare.p50_us), 1.2, "≤",
            f"{_ms(one.p50_us)} vs {_ms(one_bare.p50_us)} ms",
        ),
        Goal(
            f"light, {where}: p99 with a shadow ÷ p99 without",
            _ratio(shadow_on, shadow_off), 1.1, "≤",
            f"{_ms(shadow_on)} vs {_ms(shadow_off)} ms",
        ),
        Goal(
            "start to ready: cold (empty NUMBA_CACHE_DIR, TURNOUT_CACHE_DIR) ÷ warm",
            _ratio(cold_s, warm_s), 3.0, "≥",
            f"{_n(cold_s, 2)} vs {_n(warm_s, 2)} s (medians of {len(cold)} and {len(warm)})",
        ),
    ]  # fmt: skip


def _shadow_pair(r: Results) -> tuple[float, float, str]:
    """p99 with and without a shadow at the middle open-loop rate (equal offered load), else at
    8 connections closed loop."""
    rates = r.open_rates("fraud")
    if rates:
        rate = rates[len(rates) // 2]
        on, off = (
            r.open_summary("fraud", "turnout+shadow", rate),
            r.open_summary("fraud", "turnout", rate),
        )
        if on.ok and off.ok:
            return on.p99_us, off.p99_us, f"open loop at {rate:.0f} req/s"
    on, off = (
        r.closed_summary("fraud", "turnout+shadow", 8),
        r.closed_summary("fraud", "turnout", 8),
    )
    return on.p99_us, off.p99_us, "8 conn closed loop"


def _n(x: float, digits: int = 0) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _ms(us: float) -> str:
    if math.isnan(us):
        return "–"
    ms = us / 1000
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f} %"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cells(s: Summary) -> list[str]:
    if not s.ok:
        return ["failed: " + s.failure.replace("|", "/").replace("\n", " ")[:160]] + [""] * 9
    errors = str(s.errors)
    if s.errors and s.first_error:
        errors += " (" + s.first_error.replace("|", "/").replace("\n", " ")[:60] + ")"
    return [
        f"{s.rps:.0f}",
        _pct(s.spread),
        _ms(s.p50_us),
        _ms(s.p99_us),
        _ms(s.p999_us),
        _pct(s.server_cpu),
        "–" if math.isnan(s.server_us_per_request) else f"{s.server_us_per_request:.0f}",
        _pct(s.client_cpu),
        _pct(s.other_cpu),
        errors + ("" if not s.failed else f"; {s.failed} run(s) failed"),
    ]


_HEAD = ["req/s", "spread", "p50 ms", "p99 ms", "p99.9 ms", "server CPU", "server µs/req"]
_HEAD += ["client CPU", "other CPU", "errors"]


def closed_table(r: Results, model: str) -> list[str]:
    conns = sorted({n for (m, _, n) in r.closed if m == model})
    lines = [_row(["conn", "configuration", *_HEAD]), _row(["---"] * (2 + len(_HEAD)))]
    for n in conns:
        for config in CONFIGS:
            lines.append(
                _row([str(n), LABELS[config], *_cells(r.closed_summary(model, config, n))])
            )
    return lines


def open_table(r: Results, model: str) -> list[str]:
    head = ["offered req/s", "configuration", *_HEAD]
    lines = [_row(head), _row(["---"] * len(head))]
    for rate in r.open_rates(model):
        for config in CONFIGS:
            lines.append(
                _row([f"{rate:.0f}", LABELS[config], *_cells(r.open_summary(model, config, rate))])
            )
    return lines  # fmt: skip


def markdown(r: Results, png_name: str) -> str:
    m, s = r.machine, r.settings
    out = [
        "# Benchmarks",
        "",
        "Written by `python -m loadtests.run`; every figure below comes from one run.",
        "",
    ]
    out += ["## Machine and run", ""]
    out += [f"- {k}: {v}" for k, v in {**m, **s}.items()]
    out += ["", "## Floor: onnxruntime `session.run` in-process", ""]
    out += [
        _row(["model", "batch 1 µs/call", "best batch", "µs/sample at best", "µs/sample by batch"])
    ]
    out += [_row(["---"] * 5)]
    for model, f in r.floors.items():
        by = ", ".join(f"{b}: {us:.1f}" for b, us in f.per_sample_us)
        out.append(_row([model, f"{f.batch1_us:.1f}", str(f.best[0]), f"{f.best[1]:.1f}", by]))
    t_http, t_sample, floor = r.composed_floor()
    out += [
        "",
        f"Composed floor (heavy): t_http = bare handler's p50 latency at 1 connection − "
        f"batch-1 `session.run` = {_n(t_http * 1e6)} µs; t_sample = {_n(t_sample * 1e6)} µs; "
        f"1 / (t_http + t_sample) = **{_n(floor)} req/s**.",
        "",
    ]
    out += [
        "## Goals",
        "",
        _row(["ratio", "measured", "bound", "verdict", "figures"]),
        _row(["---"] * 5),
    ]
    for g in goals(r):
        value = "–" if math.isnan(g.value) else f"{g.value:.2f}"
        out.append(_row([g.name, value, f"{g.sense} {g.bound}", g.verdict, g.detail]))
    out += [
        "",
        "The bounds are this suite's reading of the project goals (`goals()` in "
        "`loadtests/report.py` is where to change them).",
        "",
    ]
    out += [
        "## Columns",
        "",
        "- req/s: 2xx responses per second; spread: (max − min) / median over the repeats.",
        "- p50/p99/p99.9: exact percentiles of every response's latency, timed by "
        "loadtests/infer.lua (not wrk's own, which adds synthetic samples).",
        "- server CPU: the server's processes (all threads), as a share of one core; server "
        "µs/req: its CPU time per 2xx response; client CPU: wrk; other CPU: everything else on "
        "the machine (other tenants: the machine is shared), 100 % = one core busy.",
        "- errors: non-2xx responses plus socket errors, summed over the repeats.",
        "",
    ]
    if r.handler:
        out += [
            "## In-process handler cost (no network)",
            "",
            "`loadtests/handler_cost.py`: each configuration's ASGI app called in one process "
            "with the same batch-1 `fraud` body, 10,000 requests per round, rounds alternating "
            "the order, pinned to the server CPU.",
            "",
            _row(["configuration", "µs/request (median)", "min", "max", "rounds"]),
            _row(["---"] * 5),
        ]
        for config, values in r.handler.items():
            out.append(
                _row(
                    [
                        LABELS[config],
                        f"{statistics.median(values):.1f}",
                        f"{min(values):.1f}",
                        f"{max(values):.1f}",
                        str(len(values)),
                    ]
                )
            )
        out.append("")
    for model in MODELS:
        out += [f"## Closed loop: {NAMES[model]}", "", *closed_table(r, model), ""]
    out += ["## Open loop", "", f"![latency vs throughput]({png_name})", ""]
    out += [
        "Latency here is measured from each request's *scheduled* send time, so waiting behind "
        "a slow response counts. In the plot, a hollow marker is a point where the server "
        f"answered less than {SATURATED:.0%} of the offered rate.",
        "",
    ]
    for model in MODELS:
        if r.open_rates(model):
            out += [f"### {NAMES[model]}", "", *open_table(r, model), ""]
    if r.starts:
        out += ["## Start to ready", ""]
        for kind, times in r.starts.items():
            out.append(f"- {kind}: " + ", ".join(f"{t:.2f} s" for t in times))
        out.append("")
    if r.failures:
        out += ["## Failures", "", *[f"- {f}" for f in r.failures], ""]
    return "\n".join(out)  # fmt: skip


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(12, 4.8))
    for ax, model in zip(axes, MODELS, strict=True):
        for i, config in enumerate(CONFIGS):
            pairs = [(rate, r.open_summary(model, config, rate)) for rate in r.open_rates(model)]
            pairs = [(rate, p) for rate, p in pairs if p.ok]
            if not pairs:
                continue
            x = [rate for rate, _ in pairs]
            color = f"C{i}"
            p99 = [p.p99_us / 1000 for _, p in pairs]
            p50 = [p.p50_us / 1000 for _, p in pairs]
            ax.plot(x, p99, "-", color=color, label=f"{LABELS[config]} p99")
            ax.plot(x, p50, "--", color=color, alpha=0.6, label=f"{LABELS[config]} p50")
            for rate, p in pairs:  # hollow where the server fell behind the offered rate
                kept_up = p.rps >= SATURATED * rate
                face = color if kept_up else "white"
                ax.plot([rate], [p.p99_us / 1000], "o", color=color, markerfacecolor=face)
                ax.plot([rate], [p.p50_us / 1000], "x", color=color, alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("offered requests/s (open loop, Poisson arrivals); hollow: fell behind")
        ax.set_ylabel("latency from scheduled send, ms")
        ax.set_title(NAMES[model].replace("`", ""))
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
