"""Soak: steady inference load on one gateway with a routing policy change every second, for a
bounded time. Reports requests sent, failures (every answer but 200), policy changes, feedback
posted, and the gateway's resident memory (``/proc/<pid>/status``) after warm-up and at the end.

Run: ``python -m loadtests.soak [--seconds 600] [--concurrency 8]`` starts a gateway on the demo
repository; ``--url URL --pid PID --admin-token TOKEN`` soaks a running one instead.

Memory: every answer routed by a canary, A/B or bandit policy is remembered for the feedback
join during ``--feedback-ttl-s`` (default an hour), so a gateway's memory grows with traffic ×
that TTL by design. The gateway started here uses a 10 s TTL, so after warm-up any growth is a
leak, not the join's cache; give a running gateway a short TTL too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.demo import sample_inputs, write_demo_repository

# The policies the soak cycles through, one change a second: every strategy, each a new revision.
POLICIES: list[dict[str, Any]] = [
    {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.1},
    {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}},
    {"strategy": "bandit", "arms": ["1", "2"], "min_share": 0.1},
    {"strategy": "blue_green", "active": "1", "standby": "2"},
    {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.9},
    {"strategy": "single", "version": "2"},
]
FEEDBACK_ROLES = frozenset({"baseline", "candidate", "arm"})  # canary, A/B and bandit answers
FEEDBACK_EVERY = 4  # post a reward for one answer in this many that can take one


@dataclass(frozen=True, slots=True)
class SoakResult:
    seconds: float
    sent: int
    statuses: dict[int, int]  # status code -> count; 0: no response (transport error)
    policy_changes: int
    policy_failures: int
    feedback_sent: int
    feedback_failures: int
    feedback_stale: int  # 404: the policy changed between the answer and its feedback
    rss_kib: list[tuple[float, int]]  # (seconds since start, resident KiB), one a second
    warmup_s: float

    @property
    def failures(self) -> int:
        return self.sent - self.statuses.get(200, 0)

    @property
    def rss_start_kib(self) -> int:
        """Resident memory at the end of the warm-up."""
        return next(kib for t, kib in self.rss_kib if t >= self.warmup_s)

    @property
    def rss_end_kib(self) -> int:
        return self.rss_kib[-1][1]

    @property
    def rss_growth(self) -> float:
        """Relative growth from the end of the warm-up to the end."""
        return (self.rss_end_kib - self.rss_start_kib) / self.rss_start_kib

    def summary(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return "\n".join(
            [
                f"soak: {self.seconds:.0f} s, {self.sent} requests ({rate:.0f}/s), "
                f"{self.failures} failed, statuses {dict(sorted(self.statuses.items()))}",
                f"policy changes: {self.policy_changes} ({self.policy_failures} failed); "
                f"feedback: {self.feedback_sent} ({self.feedback_failures} failed, "
                f"{self.feedback_stale} for a replaced policy revision)",
                f"resident memory: {self.rss_start_kib} KiB after {self.warmup_s:.0f} s warm-up, "
                f"{self.rss_end_kib} KiB at the end ({100 * self.rss_growth:+.1f} %), "
                f"peak {max(kib for _, kib in self.rss_kib)} KiB",
            ]
        )


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def bodies(n: int, seed: int) -> list[bytes]:
    rows = sample_inputs("fraud", n, seed=seed)["input"]
    return [
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": r.tolist()}
                ]
            }
        )
        for r in rows
    ]


@dataclass(slots=True)
class _Tally:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    feedback_sent: int = 0
    feedback_failures: int = 0
    feedback_stale: int = 0
    policy_changes: int = 0
    policy_failures: int = 0


async def soak(
    url: str,
    pid: int,
    seconds: float,
    *,
    admin_token: str,
    concurrency: int = 8,
    warmup_s: float = 5.0,
    seed: int = 0,
) -> SoakResult:
    """Load ``url``'s model ``fraud`` (versions 1 and 2, as the demo has) for ``seconds``,
    changing its policy every second and sampling ``pid``'s memory every second."""
    if seconds <= warmup_s:
        raise ValueError(f"seconds ({seconds}) must exceed the warm-up ({warmup_s})")
    admin = {"Authorization": f"Bearer {admin_token}"}
    payloads = bodies(256, seed)
    tally = _Tally()
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + seconds

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        for i in itertools.count(w, concurrency):
            if time.monotonic() >= deadline:
                return
            tally.sent += 1
            try:
                r = await client.post(
                    url + "/v2/models/fraud/infer", content=payloads[i % len(payloads)]
                )
            except httpx.HTTPError:
                tally.statuses[0] += 1
                continue
            tally.statuses[r.status_code] += 1
            answer = r.json()
            role = (answer.get("parameters") or {}).get("route_role")
            if r.status_code == 200 and role in FEEDBACK_ROLES and i % FEEDBACK_EVERY == 0:
                reward = 1.0 if answer["model_version"] == "2" else 0.0
                tally.feedback_sent += 1
                try:
                    f = await client.post(
                        url + "/v2/models/fraud/feedback",
                        json={"id": answer["id"], "reward": reward},
                    )
                    # A policy changes every second here, and a replaced revision takes no
                    # more feedback (docs/routing.md): that 404 is the documented answer.
                    stale = f.status_code == 404 and "earlier policy revision" in f.text
                    stale = stale or (f.status_code == 404 and "no longer taken" in f.text)
                    tally.feedback_stale += stale
                    tally.feedback_failures += f.status_code != 200 and not stale
                except httpx.HTTPError:
                    tally.feedback_failures += 1

    async def changes(client: httpx.AsyncClient) -> None:
        for n, policy in enumerate(itertools.cycle(POLICIES)):
            await asyncio.sleep(max(0.0, start + n - time.monotonic()))  # on the second
            if time.monotonic() >= deadline:
                return
            tally.policy_changes += 1
            try:
                r = await client.put(
                    url + "/admin/routes/fraud",
                    headers=admin,
                    json={"policy": policy, "reason": "soak"},
                )
                tally.policy_failures += r.status_code != 200
            except httpx.HTTPError:
                tally.policy_failures += 1

    async def memory() -> None:
        while (now := time.monotonic()) < deadline:
            samples.append((now - start, rss_kib(pid)))
            await asyncio.sleep(1.0)
        samples.append((time.monotonic() - start, rss_kib(pid)))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(
            memory(), changes(client), *(worker(client, w) for w in range(concurrency))
        )
    return SoakResult(
        seconds=time.monotonic() - start,
        sent=tally.sent,
        statuses=dict(tally.statuses),
        policy_changes=tally.policy_changes,
        policy_failures=tally.policy_failures,
        feedback_sent=tally.feedback_sent,
        feedback_failures=tally.feedback_failures,
        feedback_stale=tally.feedback_stale,
        rss_kib=samples,
        warmup_s=warmup_s,
    )


@contextmanager
def demo_gateway(port: int, token: str) -> Iterator[tuple[str, int]]:
    """A gateway on the demo repository (light models) in a temporary folder: (url, pid)."""
    with tempfile.TemporaryDirectory(prefix="turnout-soak-") as tmp:
        root = Path(tmp) / "models"
        write_demo_repository(root, heavy=False)
        cmd = [
            sys.executable, "-m", "gateway", "serve", "--model-repository", str(root),
            "--port", str(port), "--admin-token", f"soak={token}", "--feedback-ttl-s", "10",
        ]  # fmt: skip
        with (Path(tmp) / "gateway.log").open("wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process)
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(60)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready after {timeout_s:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8077, help="for the gateway started here")
    parser.add_argument("--url", help="soak a running gateway instead")
    parser.add_argument("--pid", type=int, help="the running gateway's process id")
    parser.add_argument("--admin-token", help="an admin token of the running gateway")
    parser.add_argument("--max-growth", type=float, default=0.10, help="fail above this")
    args = parser.parse_args(argv)

    def run(url: str, pid: int, token: str) -> SoakResult:
        return asyncio.run(
            soak(
                url,
                pid,
                args.seconds,
                admin_token=token,
                concurrency=args.concurrency,
                warmup_s=args.warmup_s,
            )
        )

    if args.url:
        if args.pid is None or args.admin_token is None:
            parser.error("--url needs --pid and --admin-token")
        result = run(args.url.rstrip("/"), args.pid, args.admin_token)
    else:
        token = secrets.token_hex(16)
        with demo_gateway(args.port, token) as (url, pid):
            result = run(url, pid, token)
    print(result.summary())
    ok = result.failures == 0 and result.policy_failures == 0 and result.feedback_failures == 0
    return 0 if ok and result.rss_growth < args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
