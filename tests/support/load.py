"""Shared by the reliability tests: a load generator that accounts for every request it sends,
a private Redis the tests may stop, and reads of a gateway's metrics and processes.

Every fault test runs real gateway processes (tests/support/server.py) under concurrent load and
asserts exact status histograms, so a lost or wrongly answered request always shows.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from gateway.demo import sample_inputs
from tests.support.redis_server import RedisServer
from tests.support.server import ADMIN, Server

T = TypeVar("T")
# Requests a burst keeps in flight. httpx queues the requests beyond its pool (100 connections)
# and rescans that queue whenever a connection frees: 600 requests gathered at once took 8 s
# where 32 at a time take under 2 s. The gateway sees the same concurrent traffic either way.
IN_FLIGHT = 32


def fraud_body(row: Sequence[float], **parameters: Any) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": list(row)}]
    }
    if parameters:
        doc["parameters"] = parameters
    return orjson.dumps(doc)


def fraud_bodies(n: int, seed: int, **parameters: Any) -> list[bytes]:
    """``n`` one-row requests for the demo's fraud scorer, drawn with a fixed seed."""
    rows = sample_inputs("fraud", n, seed=seed)["input"]
    return [fraud_body(row.tolist(), **parameters) for row in rows]


# -- load ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Shot:
    """One request a load worker sends: where, what, and a label the test groups outcomes by."""

    url: str
    body: bytes
    label: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    shot: Shot
    sent_at: float  # time.monotonic() just before sending
    written_at: float | None  # when the whole request was on the wire (None: never)
    done_at: float
    status: int  # 0: no HTTP response (a transport error)
    version: str | None
    revision: int | None  # parameters.policy_revision of a routed answer
    request_id: str | None
    error: str | None


class Load:
    """``concurrency`` workers, each sending ``shots[w], shots[w + concurrency], ...`` (cycling)
    until ``stop`` is set. Every request sent leaves exactly one outcome."""

    def __init__(
        self,
        shots: Sequence[Shot],
        concurrency: int = 8,
        *,
        keepalive: bool = True,
        timeout_s: float = 30.0,
    ) -> None:
        self.shots = list(shots)
        self.concurrency = concurrency
        self.keepalive = keepalive
        self.timeout_s = timeout_s
        self.sent = 0
        self.unanswered = 0  # requests wholly written and not answered yet
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=self.concurrency if self.keepalive else 0)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, i: int) -> None:
        while not self.stop.is_set():
            shot = self.shots[i % len(self.shots)]
            i += self.concurrency
            self.outcomes.append(await send(client, shot, self))

    def histogram(self, where: Callable[[Outcome], bool] = lambda o: True) -> Counter[int]:
        """Status code -> how many outcomes that satisfy ``where`` have it (0: no response)."""
        return Counter(o.status for o in self.outcomes if where(o))

    def by_label(self) -> Counter[tuple[str, int]]:
        """(shot label, status code) -> count, over every outcome."""
        return Counter((o.shot.label, o.status) for o in self.outcomes)

    def sent_by_label(self) -> Counter[str]:
        return Counter(o.shot.label for o in self.outcomes)


async def bounded(aws: Iterable[Awaitable[T]], limit: int = IN_FLIGHT) -> list[T]:
    """``asyncio.gather(*aws)`` with at most ``limit`` of them running at once; the results in
    order. For bursts of requests (see ``IN_FLIGHT``)."""
    gate = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with gate:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in aws)))


async def send(client: httpx.AsyncClient, shot: Shot, load: Load | None = None) -> Outcome:
    if load is not None:
        load.sent += 1
    written: list[float] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        # the client's event loop may lag between sent_at and the write: this is the write
        if event == "http11.send_request_body.complete":
            written.append(time.monotonic())
            if load is not None:
                load.unanswered += 1

    sent_at = time.monotonic()
    try:
        r = await client.post(shot.url, content=shot.body, extensions={"trace": trace})
    except httpx.HTTPError as exc:
        if written and load is not None:
            load.unanswered -= 1
        at = written[0] if written else None
        return Outcome(shot, sent_at, at, time.monotonic(), 0, None, None, None, repr(exc))
    if written and load is not None:
        load.unanswered -= 1
    body = r.json()
    parameters = body.get("parameters") or {}
    return Outcome(
        shot,
        sent_at,
        written[0] if written else None,
        time.monotonic(),
        r.status_code,
        body.get("model_version"),
        parameters.get("policy_revision"),
        body.get("id"),
        body.get("error"),
    )


# -- what a gateway says about itself -------------------------------------------------------------
def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of the metric ``name`` the gateway at ``url`` exports."""
    found = []
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            found.append((labels, float(m.group(2))))
    return found


def metric_sum(url: str, name: str, **want: str) -> float:
    return sum(
        v for labels, v in samples(url, name) if all(labels.get(k) == w for k, w in want.items())
    )


async def routes_by(client: httpx.AsyncClient, url: str, model: str) -> int:
    """The revision of ``model``'s policy the gateway process at ``url`` routes by (0: none)."""
    text = (await client.get(url + "/metrics")).text
    m = re.search(rf'^turnout_policy_revision\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


async def until_async(
    condition: Callable[[], Awaitable[object]], timeout_s: float = 10.0, interval_s: float = 0.02
) -> float:
    """``until`` (tests/support/server.py) for a scenario on an event loop: await
    ``condition()`` until it is truthy; the seconds it took. AssertionError on timeout."""
    start = time.monotonic()
    while True:
        value = await condition()
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s: {condition!r} -> {value!r}")
        await asyncio.sleep(interval_s)


def children(pid: int, command: str = "") -> list[int]:
    """The live (not zombie) child processes of ``pid`` whose command line contains
    ``command``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z" and command in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def workers(server_pid: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing spawns them; its resource tracker is not one)."""
    return children(server_pid, "spawn_main")


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: its sockets are already closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def figures(test: str, **values: object) -> None:
    """One line of figures for docs/reliability.md (seen with ``pytest -s``)."""
    print(f"\nfigures {test}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


@contextmanager
def gateways_on_own_redis(
    work: Path, demo_repo: Path
) -> Iterator[tuple[tuple[Server, Server], RedisServer]]:
    """Two ready gateways sharing a redis-server of the test's own (which the test may pause or
    restart), serving ``fraud`` and ``beta``, a copy of it."""
    root = work / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    shutil.copytree(demo_repo / "fraud", root / "beta")
    with RedisServer(work / "redis") as redis:
        a, b = (Server(root, args=["--redis-url", redis.url], wait_ready=False) for _ in range(2))
        try:
            for s in (a, b):
                s.start()
            for s in (a, b):
                s.wait_until_ready()
            yield (a, b), redis
        finally:
            for s in (a, b):
                s.stop()


async def put_policy(
    client: httpx.AsyncClient, url: str, model: str, policy: dict[str, Any]
) -> int:
    """PUT ``policy`` for ``model`` through the admin API; the new revision."""
    r = await client.put(
        f"{url}/admin/routes/{model}", headers=ADMIN, json={"policy": policy, "reason": "test"}
    )
    assert r.status_code == 200, r.text
    revision: int = r.json()["revision"]
    return revision
