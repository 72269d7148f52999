"""``drift.changed`` events: every ``drift_events_s`` (10 s), the holder of the
``drift-events`` lease reads every loaded version's drift status per feature and per prediction
column, from the fleet's merged window (what ``GET .../drift?scope=fleet`` reports), and emits
an event for each column whose status moved between ``stable``, ``watch`` and ``act``.

``insufficient`` (too few values in the window) is no status of its own: a column keeps the
last status it had. A column first seen starts from ``stable``, so a version that drifts from
its first window is reported. The last statuses live in the event outbox (``save_state``), so a
replica taking the lease over carries on from them instead of announcing every drifted column
again; only one replica emits, so each change is announced once per fleet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from gateway.background.fleet import CountsExchange
from gateway.background.tasks import holder_id, stop_task
from gateway.serving.registry import Loaded, Registry
from gateway.serving.types import Emit
from monitors.export import MonitorCounts
from router.state.outbox import Outbox, OutboxUnavailable
from router.state.store import StateStore, StoreUnavailable

log = logging.getLogger("turnout.drift_events")

LEASE_NAME = "drift-events"
STATE_NAME = "drift-status"
MAX_TRACKED = 100_000  # (version, column) statuses remembered; beyond it the oldest go


class DriftWatcher:
    def __init__(
        self,
        registry: Registry,
        exchange: CountsExchange,
        store: StateStore,
        outbox: Outbox,
        emit: Emit,
        *,
        tick_s: float = 10.0,
        lease_ttl_s: float = 3.0,
    ) -> None:
        """``tick_s``: a status change is announced within this (``drift_events_s``); each tick
        costs the PSI of every column of every version (about 5 ms a version for the demo's
        32 features), in a worker thread."""
        self.registry = registry
        self.exchange = exchange
        self.store = store
        self.outbox = outbox
        self.emit = emit
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.holder = holder_id()
        self.leader = False
        self._last: dict[str, str] | None = None  # "feature:model/version/column" -> status
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drift events")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug in one tick must not end the watcher for good
                log.exception("drift watch failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        try:
            leader = await self.store.acquire_lease(LEASE_NAME, self.holder, self.lease_ttl_s)
        except StoreUnavailable:
            leader = False
        if not leader:
            self.leader, self._last = False, None  # read the statuses again once leading
            return
        self.leader = True
        if self._last is None:
            try:
                blob = await self.outbox.load_state(STATE_NAME)
            except OutboxUnavailable as exc:
                log.warning("drift statuses not read, the outbox is unavailable: %s", exc)
                return
            self._last = dict(orjson.loads(blob)) if blob else {}
        view = await self.exchange.view("fleet")
        judged = [
            (loaded, view.monitors[key])
            for loaded in self.registry.loaded()
            if (key := (loaded.info.model, loaded.info.version)) in view.monitors
        ]
        # PSI and p-values of every column of every version: milliseconds a version, off the
        # event loop (the counts are copies; the profiles never change).
        loop = asyncio.get_running_loop()
        reports = await loop.run_in_executor(None, _reports, judged)
        changed = False
        for key, report in reports:
            prefix = f"{key[0]}/{key[1]}/"
            for of, columns in (("feature", report["features"]), ("prediction", report["outputs"])):
                for column in columns:
                    changed |= self._see(prefix + column["name"], of, column, report["window_s"])
        if changed:
            while len(self._last) > MAX_TRACKED:
                del self._last[next(iter(self._last))]
            try:
                await self.outbox.save_state(STATE_NAME, orjson.dumps(self._last))
            except OutboxUnavailable as exc:
                log.warning("drift statuses not saved: %s", exc)

    def _see(self, subject: str, of: str, column: dict[str, object], window_s: object) -> bool:
        assert self._last is not None
        status = str(column["status"])
        if status == "insufficient":
            return False
        key = f"{of}:{subject}"
        before = self._last.get(key, "stable")
        if status == before:
            if key not in self._last:
                self._last[key] = status
                return True
            return False
        self._last[key] = status
        self.emit(
            "drift.changed",
            subject,
            {
                "from": before,
                "to": status,
                "psi": column["psi"],
                "critical_psi": column["critical_psi"],
                "column": of,
                "window_s": window_s,
                "at": time.time(),
            },
        )
        return True


def _reports(judged: list[tuple[Loaded, MonitorCounts]]) -> list[tuple[tuple[str, str], Any]]:
    out = []
    for loaded, counts in judged:
        try:
            report = loaded.monitor.report(counts)
        except ValueError:  # replicas serve different files under this version
            continue
        out.append(((loaded.info.model, loaded.info.version), report))
    return out
