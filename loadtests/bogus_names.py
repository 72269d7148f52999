"""What 20,000 inference requests to model names that do not exist leave in a gateway (issue 14,
finding 1): the size of ``/metrics`` afterwards and the gateway's resident memory.

Writes the demo repository (without ``heavy``) to a temporary folder, starts a real gateway
process (``python -m gateway serve``, one worker, the memory store) and waits for
``/v2/health/ready``. Then sends ``--requests`` POSTs to ``/v2/models/<bogus name i>/infer``, each
name used once, with a small JSON body over ``--connections`` concurrent connections; one second
after the last answer reads ``VmRSS`` of the gateway, then ``/metrics`` (its size in bytes and
lines, how many of its lines carry a bogus name, how long the scrape took), then ``VmRSS`` again.
With ``--api-key`` the gateway is started with ``--api-key k=secret-key-0123`` (keys have at
least 8 characters) and the requests carry no key (each answer should be a 401).

The script imports nothing from the repository but ``gateway.demo``, and the gateway process runs
the ``gateway`` package that ``python -c "import gateway"`` finds from the working directory
(printed first), so it measures any checkout:

    cd /work/main && .venv/bin/python loadtests/bogus_names.py
    cd /work/main && .venv/bin/python loadtests/bogus_names.py --api-key
    # the code of another commit, from a worktree of it:
    git worktree add --detach /tmp/before14 5665573
    cd /tmp/before14 && PYTHONPATH=/tmp/before14 /work/main/.venv/bin/python \\
        /work/main/loadtests/bogus_names.py [--api-key]

Prints one line per figure and a final ``figures`` line (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BODY = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[0.1,0.2,0.3,0.4]}]}'
API_KEY = "secret-key-0123"  # keys must be at least 8 characters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_ready(
    process: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180.0
) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                sys.exit(f"gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if client.get(url + "/v2/health/ready").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    sys.exit(f"gateway not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


async def flood(url: str, names: list[str], connections: int) -> collections.Counter[int]:
    """POST the body to each name's infer URL, ``connections`` at a time; status histogram."""
    statuses: collections.Counter[int] = collections.Counter()
    todo = iter(names)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def worker() -> None:
            for name in todo:
                try:
                    r = await client.post(f"/v2/models/{name}/infer", content=BODY, headers=headers)
                    statuses[r.status_code] += 1
                except httpx.TransportError:
                    statuses[0] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=20_000, help="bogus names, one request each"
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--name-length", type=int, default=32, help="characters per bogus name")
    parser.add_argument(
        "--api-key", action="store_true", help="start with --api-key k=secret-key-0123; send no key"
    )
    o = parser.parse_args()

    imported = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"gateway package: {imported}")

    sys.path.insert(0, os.getcwd())  # the checkout measured is the working directory's
    from gateway.demo import write_demo_repository

    if not Path(sys.modules["gateway"].__file__ or "").samefile(imported):
        sys.exit(f"this script imported {sys.modules['gateway'].__file__}, the gateway {imported}")

    tag = secrets.token_hex(4)
    stem = f"bogus-{tag}-"
    width = max(1, o.name_length - len(stem))
    names = [f"{stem}{i:0{width}d}" for i in range(o.requests)]

    with tempfile.TemporaryDirectory(prefix="bogus-names-") as tmp:
        root = Path(tmp) / "models"
        write_demo_repository(root, heavy=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(root)]
        cmd += ["--port", str(port)]
        if o.api_key:
            cmd += ["--api-key", f"k={API_KEY}"]
        log = Path(tmp) / "gateway.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()
            )
        try:
            ready_s = wait_ready(process, url, log)
            time.sleep(1.0)
            rss_before = vm_rss_kib(process.pid)
            t0 = time.monotonic()
            statuses = asyncio.run(flood(url, names, o.connections))
            flood_s = time.monotonic() - t0
            time.sleep(1.0)
            rss_after = vm_rss_kib(process.pid)
            with httpx.Client(timeout=120.0) as client:
                t0 = time.monotonic()
                metrics = client.get(url + "/metrics")
                scrape_s = time.monotonic() - t0
            metrics.raise_for_status()
            rss_scraped = vm_rss_kib(process.pid)
            text = metrics.text
            lines = text.splitlines()
            bogus_lines = sum(1 for line in lines if stem in line)
            unknown_lines = sum(1 for line in lines if 'model="_unknown"' in line)
            refused = sum(
                float(line.rsplit(" ", 1)[1])
                for line in lines
                if line.startswith("turnout_refused_total{")
            )
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    figures = {
        "gateway": imported,
        "api_key": o.api_key,
        "requests": o.requests,
        "name_length": len(names[0]),
        "connections": o.connections,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "ready_s": round(ready_s, 2),
        "flood_s": round(flood_s, 2),
        "metrics_bytes": len(metrics.content),
        "metrics_lines": len(lines),
        "metrics_lines_with_bogus_names": bogus_lines,
        "metrics_lines_model_unknown": unknown_lines,
        "scrape_s": round(scrape_s, 3),
        "turnout_refused_total": refused,
        "rss_kib_before": rss_before,
        "rss_kib_after_flood": rss_after,
        "rss_kib_after_scrape": rss_scraped,
    }
    print(f"answers: {figures['statuses']} in {flood_s:.1f} s")
    print(
        f"/metrics: {len(metrics.content):,} bytes, {len(lines):,} lines "
        f'({bogus_lines:,} with a bogus name, {unknown_lines:,} with model="_unknown"), '
        f"scraped in {scrape_s * 1000:.0f} ms; turnout_refused_total {refused:,.0f}"
    )
    print(
        f"VmRSS: {rss_before:,} KiB before, {rss_after:,} KiB after the requests "
        f"({(rss_after - rss_before) / 1024:+.1f} MiB), {rss_scraped:,} KiB after the scrape"
    )
    print("figures " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
