"""One wrk run with loadtests/infer.lua: the command, the CPU time around it, the parsed summary.
Parsing never raises: a run that printed no summary comes back with ``error`` set."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtests.harness import machine_busy_seconds, pinned

SCRIPT = Path(__file__).with_name("infer.lua")
MARKER = "INFER_JSON "


@dataclass(frozen=True, slots=True)
class WrkPoint:
    """One measured point. Latencies in µs; CPU as the share of one core over the run: the
    server's process tree, wrk, and everything else on the machine (other tenants, this script)."""

    requests: int
    ok: int
    duration_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    errors: int
    server_cpu: float
    client_cpu: float
    other_cpu: float
    first_error: str = ""
    error: str = ""

    @property
    def rps(self) -> float:
        """Successful (2xx) responses per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def server_cpu_us_per_request(self) -> float:
        return self.server_cpu * self.duration_s / self.ok * 1e6 if self.ok else float("nan")


def failed(message: str) -> WrkPoint:
    nan = float("nan")
    return WrkPoint(0, 0, 0.0, nan, nan, nan, 0, nan, nan, nan, error=message)


def parse(stdout: str) -> dict[str, float | str]:
    """The summary printed by infer.lua's done(); ``{}`` when there is none or it is malformed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                value = json.loads(line[len(MARKER) :])
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


_TEXT_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


def run_wrk(
    url: str,
    body_path: Path,
    *,
    connections: int,
    duration_s: float,
    rate_per_connection: float = 0.0,
    cpus: str | None = None,
    server_cpu: Callable[[], float] | None = None,
    seed: int = 1,
    timeout_s: int = 30,
) -> WrkPoint:
    """Closed loop when ``rate_per_connection`` is 0, else open loop; one wrk thread per
    connection either way. ``server_cpu`` returns the server's CPU seconds so far."""
    cmd = pinned(
        [
            "wrk", f"-t{connections}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={timeout_s}s", "-s", str(SCRIPT), url,
        ],
        cpus,
    )  # fmt: skip
    env = dict(os.environ)
    env.update(
        INFER_BODY=str(body_path), INFER_RATE=repr(rate_per_connection), INFER_SEED=str(seed)
    )
    try:
        before = server_cpu() if server_cpu else float("nan")
        children_before = _children_cpu()
        busy_before = machine_busy_seconds()
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = duration_s + timeout_s + 30
        try:
            stdout, stderr = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return failed(f"wrk did not finish in {deadline:.0f} s")
        wall = time.monotonic() - started
        busy = machine_busy_seconds() - busy_before
        after = server_cpu() if server_cpu else float("nan")
    except OSError as exc:
        return failed(f"cannot run wrk: {exc}")
    # wrk is the only child that exits meanwhile, so the children's CPU delta is wrk's own.
    client = _children_cpu() - children_before
    summary = parse(stdout)
    if proc.returncode != 0 or not summary:
        rps = _TEXT_RPS.search(stdout)
        detail = (stderr.strip() or stdout.strip())[-500:]
        hint = f" (text output said {rps.group(1)} req/s)" if rps else ""
        return failed(f"wrk exited {proc.returncode} without a summary{hint}: {detail}")
    other = busy - client - (after - before)
    return _point(summary, wall, after - before, client, other)


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def _num(summary: dict[str, float | str], key: str) -> float:
    value = summary.get(key)
    return float(value) if isinstance(value, int | float) else float("nan")


def _point(
    summary: dict[str, float | str],
    wall: float,
    server: float,
    client: float,
    other: float,
) -> WrkPoint:
    duration = _num(summary, "duration_us") / 1e6
    requests = int(_num(summary, "requests"))
    non2xx = int(_num(summary, "non2xx"))
    socket_errors = sum(
        int(_num(summary, k)) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    first = summary.get("first_error", "")
    return WrkPoint(
        requests=requests,
        ok=max(0, requests - non2xx),
        duration_s=duration,
        p50_us=_num(summary, "p50_us"),
        p99_us=_num(summary, "p99_us"),
        p999_us=_num(summary, "p999_us"),
        errors=non2xx + socket_errors,
        server_cpu=server / wall if wall > 0 else float("nan"),
        client_cpu=client / wall if wall > 0 else float("nan"),
        other_cpu=other / wall if wall > 0 else float("nan"),
        first_error=first if isinstance(first, str) else "",
    )
