"""Load tests: Turnout (no policy, canary, shadow) against a bare starlette + onnxruntime handler
and the in-process onnxruntime floor; writes docs/benchmarks.md and docs/benchmarks.png.

Run: ``.venv/bin/python -m loadtests.run [--quick]``. Needs ``wrk`` on PATH (Debian: ``apt-get
install wrk``) and matplotlib. Servers run on one CPU and wrk on another when the machine has two.
A configuration that fails is written into the report; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from loadtests import compare_commits, floor, handler_cost, prediction_log_cost, report
from loadtests.harness import ServerProcess, StartError, free_port
from loadtests.results import CONFIGS, MODELS, Results
from loadtests.wrk import WrkPoint, failed, run_wrk

ADMIN_TOKEN = "bench-admin-token-0123456789"
FEATURES = {"fraud": 32, "heavy": 256}
POLICIES: dict[str, dict[str, Any]] = {
    "turnout+canary": {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.1},
    # The primary is the version "no policy" serves (the latest), so enabling the shadow is the
    # only difference between the two.
    "turnout+shadow": {
        "strategy": "single",
        "version": "2",
        "shadow": {"versions": ["1"], "sample": 1.0},
    },
}


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float
    repeats: int
    connections: tuple[int, ...]
    open_fractions: tuple[float, ...]
    open_connections: int
    starts: int
    server_cpus: str | None
    client_cpus: str | None
    docs: Path
    quick: bool
    render: Path | None


def parse_options(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="loadtests.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="≈3 s per point, 2 repeats")
    p.add_argument("--duration", type=float, help="seconds per point (default 10, quick 3)")
    p.add_argument("--repeats", type=int, help="runs per point, medians quoted (default 3)")
    p.add_argument("--connections", default="1,8,64")
    p.add_argument("--open-fractions", default="0.25,0.5,0.75")
    p.add_argument("--open-connections", type=int, default=32)
    p.add_argument("--starts", type=int, help="cold and warm starts each (default 3, quick 2)")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to CPUs")
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    p.add_argument("--render", type=Path, help="only rewrite the report from a results.pickle")
    a = p.parse_args(argv)
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    return Options(
        duration_s=a.duration or (3.0 if a.quick else 10.0),
        repeats=a.repeats or (2 if a.quick else 3),
        connections=tuple(int(c) for c in a.connections.split(",")),
        open_fractions=tuple(float(f) for f in a.open_fractions.split(",")),
        open_connections=a.open_connections,
        starts=a.starts or (2 if a.quick else 3),
        server_cpus="1" if pin else None,
        client_cpus="0" if pin else None,
        docs=a.docs,
        quick=a.quick,
        render=a.render,
    )


def machine() -> dict[str, str]:
    import onnxruntime

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "wrk": (wrk.stdout.splitlines() or ["unknown"])[0],
        "commit": commit.stdout.strip() + " (working tree may hold uncommitted changes)",
    }


def prepare_repository(root: Path) -> Path:
    """The demo repository plus ``heavy/2``, a copy of ``heavy/1``, so policies apply to both."""
    repo = root / "models"
    subprocess.run(
        [sys.executable, "-m", "gateway", "demo-repo", str(repo)], check=True, capture_output=True
    )
    shutil.copytree(repo / "heavy" / "1", repo / "heavy" / "2", dirs_exist_ok=True)
    return repo


def sample_rows(repo: Path, model: str, n: int) -> np.ndarray:
    """Rows from the model's reference sample (its training distribution) when it has one."""
    ref = repo / model / "1" / "reference.npy"
    if ref.exists():
        rows: np.ndarray = np.load(ref)[:n].astype(np.float32)
        return rows
    return np.random.default_rng(7).standard_normal((n, FEATURES[model])).astype(np.float32)


def write_body(path: Path, row: np.ndarray) -> Path:
    tensor = {"name": "input", "shape": [1, row.size], "datatype": "FP32", "data": row.tolist()}
    path.write_bytes(orjson.dumps({"inputs": [tensor]}))
    return path


# Flags of a configuration beyond the common ones.
FLAGS = {"turnout-monitors": ["--no-monitors"]}


def gateway(name: str, repo: Path, work: Path, cpus: str | None, cache: Path) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo),
        "--port", str(port), "--admin-token", f"bench={ADMIN_TOKEN}", "--log-level", "warning",
        *FLAGS.get(name, []),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    env["NUMBA_CACHE_DIR"] = str(cache)
    env["TURNOUT_CACHE_DIR"] = str(cache / "reference")
    return ServerProcess(name, cmd, port, work, cpus=cpus, env=env)


def bare(repo: Path, work: Path, cpus: str | None) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "loadtests.bare", "--model-repository", str(repo)]
    return ServerProcess("bare", [*cmd, "--port", str(port)], port, work, cpus=cpus)


def measure_starts(r: Results, o: Options, repo: Path, work: Path) -> None:
    for i in range(o.starts):
        cache = Path(tempfile.mkdtemp(prefix="numba-cache-", dir=work))
        for kind in ("cold", "warm"):
            server = gateway(f"start-{kind}-{i}", repo, work, None, cache)
            try:
                server.start()
                r.starts.setdefault(kind, []).append(server.wait_ready())
            except (StartError, OSError) as exc:
                r.failures.append(f"{kind} start {i}: {exc}")
            finally:
                server.stop()
        cold, warm = r.starts.get("cold", [float("nan")]), r.starts.get("warm", [float("nan")])
        print(f"start {i}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s")


def start_servers(r: Results, o: Options, repo: Path, work: Path) -> dict[str, ServerProcess | str]:
    """Every configuration's server, ready and with its policy set; a failure as its message."""
    cache = work / "numba-cache"
    servers: dict[str, ServerProcess | str] = {}
    for config in CONFIGS:
        if config == "bare":
            server = bare(repo, work, o.server_cpus)
        else:
            server = gateway(config, repo, work, o.server_cpus, cache)
        try:
            server.start()
            server.wait_ready()
            policy = POLICIES.get(config)
            for model in MODELS if policy else ():
                response = httpx.put(
                    f"{server.url}/admin/routes/{model}",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    json={"policy": policy, "reason": "bench"},
                    timeout=30,
                )
                if response.status_code >= 300:
                    status, text = response.status_code, response.text
                    raise StartError(f"PUT /admin/routes/{model}: {status} {text}")
            servers[config] = server
        except (StartError, OSError, httpx.HTTPError) as exc:
            server.stop()
            servers[config] = f"{config}: {exc}"
            r.failures.append(f"{config} could not be started: {exc}")
    return servers


def point(
    server: ServerProcess | str, model: str, body: Path, o: Options, conns: int, rate: float = 0.0
) -> WrkPoint:
    if isinstance(server, str):
        return failed(server.splitlines()[0][:300])
    if not server.alive():
        return failed(f"{server.name} is not running: {server.log_tail(5)}")
    result = run_wrk(
        f"{server.url}/v2/models/{model}/infer",
        body,
        connections=conns,
        duration_s=o.duration_s,
        rate_per_connection=rate / conns,
        cpus=o.client_cpus,
        server_cpu=server.cpu_seconds,
    )
    time.sleep(0.5)  # let the server drain before the next point
    return result


def run(r: Results, o: Options) -> None:
    """Fill ``r``; exceptions that end the run early propagate (``main`` reports them)."""
    r.machine = machine()
    r.settings = {
        "points": f"{o.duration_s:.0f} s each, {o.repeats} repeats (medians quoted; spread = "
        "(max − min) / median of req/s), configurations interleaved within each repeat, "
        "their order rotated by one each repeat",
        "pinning": f"servers on CPU {o.server_cpus}, wrk on CPU {o.client_cpus} (taskset)"
        if o.server_cpus
        else "none",
        "closed loop": "wrk, one thread per connection; "
        + ", ".join(map(str, o.connections))
        + " connections",
        "open loop": f"wrk with loadtests/infer.lua pacing: {o.open_connections} connections "
        "(one per thread), each a Poisson process; rates are "
        + ", ".join(f"{f:.0%}" for f in o.open_fractions)
        + " of Turnout's (no policy) best closed-loop req/s",
        "requests": "batch 1, JSON; fraud rows from its reference sample; heavy rows N(0, 1)",
        "models": "fraud v2 (no policy, with monitors on and off, bare), canary 1 → 2 at 10 %, "
        "shadow: v2 answers and v1 shadows every request; heavy the same with heavy/2 a copy "
        "of heavy/1",
    }
    r.machine["load average at start"] = _loadavg()
    work = Path(tempfile.mkdtemp(prefix="turnout-bench-"))
    print(f"work directory: {work}")
    repo = prepare_repository(work)
    bodies = {m: write_body(work / f"{m}.json", sample_rows(repo, m, 1)[0]) for m in MODELS}

    try:
        measure_floors(r, o, repo)
        print("in-process handler cost (ASGI, no network)")
        with floor.on_cpus({int(o.server_cpus)} if o.server_cpus else None):
            r.handler = handler_cost.measure(repo, rounds=4 if o.quick else 10)
        for config, values in r.handler.items():
            print(f"  {config}: {statistics.median(values):.1f} µs/request")
        print("cold and warm starts")
        measure_starts(r, o, repo, work)
        servers = start_servers(r, o, repo, work)
        try:
            measure_load(r, o, servers, bodies)
        finally:
            for server in servers.values():
                if not isinstance(server, str):
                    server.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    r.machine["load average at end"] = _loadavg()
    print(f"server logs: {work}")


def measure_floors(r: Results, o: Options, repo: Path) -> None:
    print("floor: onnxruntime in-process")
    with floor.on_cpus({int(o.server_cpus)} if o.server_cpus else None):
        for model in MODELS:
            path = repo / model / "2" / "model.onnx"
            rows = sample_rows(repo, model, 256)
            try:
                f = floor.measure(model, path, rows, repeats=3 if o.quick else 7)
            except Exception as exc:  # onnxruntime's own exception types
                r.failures.append(f"floor of {model}: {exc}")
                continue
            r.floors[model] = f
            best, best_us = f.best
            print(f"  {model}: batch 1 {f.batch1_us:.1f} µs; batch {best}: {best_us:.1f} µs/sample")


def measure_load(
    r: Results, o: Options, servers: dict[str, ServerProcess | str], bodies: dict[str, Path]
) -> None:
    """Closed loop, then open loop at rates taken from it; configurations interleaved."""
    for server in servers.values():  # warm up: 1 s at 8 connections per model
        for model in MODELS:
            if not isinstance(server, str):
                url = f"{server.url}/v2/models/{model}/infer"
                run_wrk(url, bodies[model], connections=8, duration_s=1, cpus=o.client_cpus)
    for rep in range(o.repeats):
        for model in MODELS:
            for conns in o.connections:
                for config in rotated(CONFIGS, rep):
                    p = point(servers[config], model, bodies[model], o, conns)
                    r.closed.setdefault((model, config, conns), []).append(p)
                    _say("closed", rep, model, config, f"{conns} conn", p)
    rates = {m: open_rates(r, m, o.open_fractions) for m in MODELS}
    for rep in range(o.repeats):
        for model in MODELS:
            for rate in rates[model]:
                for config in rotated(CONFIGS, rep):
                    server = servers[config]
                    p = point(server, model, bodies[model], o, o.open_connections, rate)
                    r.open.setdefault((model, config, float(rate)), []).append(p)
                    _say("open", rep, model, config, f"{rate} req/s", p)


def rotated(configs: Sequence[str], rep: int) -> list[str]:
    """The configurations in an order that starts one later each repeat: the first point of a
    group measured lower than the others whatever its configuration (seen: Turnout without a
    policy below Turnout with a canary, which does more work)."""
    k = rep % len(configs)
    return [*configs[k:], *configs[:k]]


def open_rates(r: Results, model: str, fractions: Sequence[float]) -> list[int]:
    """Fractions of Turnout's (no policy) best closed-loop rate, or of the best configuration's
    when Turnout failed; none when nothing ran."""
    best = r.closed_max_rps(model, "turnout")
    if math.isnan(best):
        best = max(
            (x for c in CONFIGS if not math.isnan(x := r.closed_max_rps(model, c))), default=0
        )
    return [round(best * f) for f in fractions if best * f >= 1]


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1, 5, 15 min)"


def _say(kind: str, rep: int, model: str, config: str, where: str, p: WrkPoint) -> None:
    if p.error:
        print(f"  {kind} #{rep} {model:<5} {config:<15} {where:>12}: FAILED {p.error[:200]}")
    else:
        print(
            f"  {kind} #{rep} {model:<5} {config:<15} {where:>12}: {p.rps:8.0f} req/s "
            f"p50 {p.p50_us / 1000:7.3f} p99 {p.p99_us / 1000:8.3f} ms  errors {p.errors}  "
            f"server {p.server_cpu:4.0%} client {p.client_cpu:4.0%} other {p.other_cpu:4.0%}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_options(argv)
    if o.render:
        r: Results = pickle.loads(o.render.read_bytes())
    elif shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    else:
        # SIGTERM unwinds like an exception, so the servers started so far are stopped.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        r = Results()
        try:
            run(r, o)
        except Exception as exc:  # keep what was measured and say where the run stopped
            r.failures.append(f"the run stopped early: {type(exc).__name__}: {exc}")
            print(r.failures[-1], file=sys.stderr)
        saved = Path(tempfile.gettempdir()) / "turnout-bench-results.pickle"
        saved.write_bytes(pickle.dumps(r))
        print(f"results saved to {saved} (re-render with --render)")
    o.docs.mkdir(parents=True, exist_ok=True)
    target = o.docs / "benchmarks.md"
    doc = target.read_text() if target.exists() else ""
    sections = (
        compare_commits.kept_section(doc),
        compare_commits.kept_section(doc, prediction_log_cost.START, prediction_log_cost.END),
    )
    kept = "\n\n".join(section for section in sections if section)
    target.write_text(report.markdown(r, "benchmarks.png") + ("\n" + kept + "\n" if kept else ""))
    report.plot(r, o.docs / "benchmarks.png")
    for g in report.goals(r):
        value = "–" if g.value != g.value else f"{g.value:.2f}"
        print(f"{g.verdict.strip('*'):>12}  {value:>6} {g.sense} {g.bound}  {g.name} ({g.detail})")
    print(f"wrote {o.docs / 'benchmarks.md'} and {o.docs / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
