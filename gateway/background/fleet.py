"""Views wider than one process: the process group (the workers of one server) and the fleet.

Every process publishes its counters (request counts, each version's monitor counts and runtime
statistics) to the state store once a second, with a TTL, under a member name ``host:group:pid``.
A reader merges its own fresh counters with the other members' last publish: a scrape of
``/metrics`` and Triton's statistics report the process group, whichever worker answers; the
drift endpoint and the statistics can report the whole fleet.
With one worker and no Redis there is nothing to read and the views are the process's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import orjson

from gateway.background.tasks import stop_task
from gateway.serving.batcher import BatchingRuntime
from gateway.serving.registry import Registry
from gateway.serving.statistics import Figures
from gateway.serving.traffic import Traffic, View
from monitors.export import MonitorCounts
from router.state.store import StateStore, StoreUnavailable

log = logging.getLogger("turnout.fleet")

Scope = Literal["process", "group", "fleet"]
# Every member publishes its traffic (every version of the gateway has): a field to count the
# live members by, without reading their whole publish (gateway.http.limits).
TRAFFIC = "traffic"
_MONITOR = "monitor/"
_RUNTIME = "runtime/"
_READY = "ready"  # the [model, version, sha256] this process serves READY


class CountsExchange:
    def __init__(
        self,
        store: StateStore,
        registry: Registry,
        traffic: Traffic,
        *,
        shared: bool,
        workers: int,
        interval_s: float = 1.0,
        monitors: bool = True,
    ) -> None:
        """``shared``: the store is shared (Redis), so there is something to publish to.
        ``monitors``: off, views carry request counts only."""
        group_pid = os.getppid() if workers > 1 else os.getpid()
        self.group = f"{socket.gethostname()}:{group_pid}:"
        self.member = f"{self.group}{os.getpid()}"
        self.store = store
        self.registry = registry
        self.traffic = traffic
        self.shared = shared
        self.workers = workers
        self.interval_s = interval_s
        self.monitors = monitors
        # more counters to publish beside the traffic and monitors (the quality accumulators):
        # each source answers name -> bytes, under names of its own
        self.sources: list[Callable[[float], Mapping[str, bytes]]] = []
        self._task: asyncio.Task[None] | None = None

    def local(self, now: float) -> View:
        view = View(Counter(self.traffic.requests), Counter(self.traffic.inflight))
        loaded_versions = self.registry.loaded()
        for loaded in loaded_versions if self.monitors else ():
            view.add_monitor((loaded.info.model, loaded.info.version), loaded.monitor.export(now))
        for loaded in loaded_versions:
            if isinstance(loaded.runtime, BatchingRuntime):
                key = (loaded.info.model, loaded.info.version)
                view.add_runtime(key, loaded.runtime.stats.figures())
        return view

    async def view(self, scope: Scope) -> View:
        """This process merged with the other live members of ``scope``."""
        view = self.local(time.monotonic())
        others, _ = await self.others(scope)
        for blobs in others:
            _merge(view, blobs)
            view.members += 1
        return view

    async def others(
        self, scope: Scope, fields: Sequence[str] | None = None
    ) -> tuple[list[dict[str, bytes]], int]:
        """The last publish of every other live member of ``scope`` (only its ``fields``, when
        given), and the number of processes in the view (this one included); only this process
        without a shared store or when the store does not answer."""
        if not self.shared or scope == "process" or (scope == "group" and self.workers == 1):
            return [], 1
        try:
            prefix = self.group if scope == "group" else ""
            members = await self.store.read_counts(prefix, fields)
        except StoreUnavailable as exc:
            log.warning("%s view is this process only: %s", scope, exc)
            return [], 1
        found = [blobs for member, blobs in members.items() if member != self.member]
        return found, 1 + len(found)

    async def lacking(self, model: str, version: str, sha256: str) -> int:
        """Other live processes of the fleet that serve ``model`` but not this artifact as its
        ``version`` (READY), by their last publish. A process that serves no version of the
        model (a fleet sharded by model) or publishes no list of what it serves (an older
        gateway) is not counted; 0 without a shared store."""
        others, _ = await self.others("fleet", (_READY,))
        wanted = [model, version, sha256]
        lacking = 0
        for blobs in others:
            raw = blobs.get(_READY)
            if raw is None:
                continue
            try:
                serving = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            lacking += wanted not in serving and any(item[0] == model for item in serving)
        return lacking

    def blobs(self, now: float) -> dict[str, bytes]:
        view = self.local(now)
        out = {
            TRAFFIC: orjson.dumps(
                {"requests": [[*k, n] for k, n in view.requests.items()], "inflight": view.inflight}
            )
        }
        for (model, version), counts in view.monitors.items():
            out[f"{_MONITOR}{model}/{version}"] = counts.to_bytes()
        for (model, version), figures in view.runtimes.items():
            out[f"{_RUNTIME}{model}/{version}"] = figures.to_bytes()
        out[_READY] = orjson.dumps(
            sorted(
                [lv.info.model, lv.info.version, lv.info.sha256] for lv in self.registry.loaded()
            )
        )
        for source in self.sources:
            out.update(source(now))
        return out

    def start(self) -> None:
        if self.shared:
            self._task = asyncio.create_task(self._publish_loop(), name="fleet publish")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _publish_loop(self) -> None:
        while True:
            try:
                blobs = self.blobs(time.monotonic())
                await self.store.publish_counts(self.member, blobs, ttl_s=5 * self.interval_s)
            except StoreUnavailable as exc:
                log.debug("counters not published: %s", exc)
            await asyncio.sleep(self.interval_s)


def _merge(view: View, blobs: dict[str, bytes]) -> None:
    for name, blob in blobs.items():
        try:
            if name == TRAFFIC:
                traffic = orjson.loads(blob)
                for *key, n in traffic["requests"]:
                    view.requests[(key[0], key[1], key[2], key[3])] += int(n)
                for model, n in traffic["inflight"].items():
                    view.inflight[model] += int(n)
            elif name.startswith(_MONITOR):
                model, _, version = name.removeprefix(_MONITOR).rpartition("/")
                view.add_monitor((model, version), MonitorCounts.from_bytes(blob))
            elif name.startswith(_RUNTIME):
                model, _, version = name.removeprefix(_RUNTIME).rpartition("/")
                view.add_runtime((model, version), Figures.from_bytes(blob))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable counters %r skipped: %s", name, exc)
