"""Loaded model versions: load, unload and swap atomically without interrupting traffic.

The serving table is a dict of immutable snapshots replaced whole on every change, so a request
sees either the old table or the new one. All methods run on the event loop thread; blocking
work (reading files, building sessions) goes to an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Literal

from gateway.errors import BadRequest, LoadError, NotFound, NotReady, cut
from gateway.serving.monitoring import reference_input
from gateway.serving.repository import (
    check_model_name,
    check_version_name,
    list_models,
    list_versions,
    version_folder,
    version_key,
)
from gateway.serving.types import Emit, ModelVersion, Runtime, emit_nothing
from monitors import VersionMonitor

log = logging.getLogger("turnout.registry")

State = Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE", "FAILED"]
Loader = Callable[[str, str, Path], tuple[ModelVersion, Runtime, VersionMonitor]]


@dataclass(slots=True, eq=False)
class Loaded:
    """A ready version. ``with loaded:`` marks a request in flight so unload can wait for it."""

    info: ModelVersion
    runtime: Runtime
    monitor: VersionMonitor
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    drift_input: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.drift_input = reference_input(self.info)

    def __enter__(self) -> Loaded:
        self.inflight += 1
        self._idle.clear()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self) -> None:
        if self.inflight:
            await self._idle.wait()


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    reason: str = ""


class Registry:
    def __init__(
        self,
        root: Path,
        loader: Loader,
        executor: Executor | None = None,
        *,
        emit: Emit = emit_nothing,
    ) -> None:
        """``emit``: where ``model.loaded``, ``model.unloaded`` and ``model.failed`` go. Each
        replica loads for itself, so each emits its own, naming itself in ``data.replica``."""
        self.root = root
        self.emit = emit
        self.replica = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self._loader = loader
        self._executor = executor
        self._table: MappingProxyType[str, MappingProxyType[str, Loaded]] = MappingProxyType({})
        # Each model's highest ready version, kept by _publish: the default route asks on every
        # request, and finding the maximum there cost 0.9 µs (loadtests/stage_cost.py).
        self._latest: MappingProxyType[str, Loaded] = MappingProxyType({})
        self._status: dict[tuple[str, str], Status] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[str], None]] = []
        # Set by the app once its start-up (this registry's first load included) has finished:
        # until then an unknown model may be one not loaded yet.
        self.started = False

    # -- reads (hot path) -------------------------------------------------------------------
    def get(self, model: str, version: str) -> Loaded:
        versions = self._table.get(model)
        if versions is not None:
            loaded = versions.get(version)
            if loaded is not None:
                return loaded
        status = self._status.get((model, version))
        if status is None:
            if versions is None and not self.known(model):
                raise NotFound(f"unknown model {cut(model)!r}")
            raise NotFound(f"unknown version {cut(version)!r} of model {cut(model)!r}")
        raise NotReady(
            f"model {cut(model)!r} version {version} is not ready ({status.state.lower()})"
        )

    def latest(self, model: str) -> Loaded:
        loaded = self._latest.get(model)
        if loaded is None:
            if self.known(model):
                raise NotReady(f"model {cut(model)!r} has no ready version")
            raise NotFound(f"unknown model {cut(model)!r}")
        return loaded

    def artifacts(self, model: str, versions: Iterable[str]) -> dict[str, str]:
        """The sha256 of each version's artifact: what a policy change routes to (audited)."""
        return {v: self.get(model, v).info.sha256 for v in sorted(versions)}

    def ready_versions(self, model: str) -> list[str]:
        return sorted(self._table.get(model, {}), key=version_key)

    def known(self, model: str) -> bool:
        return model in self._table or any(m == model for m, _ in self._status)

    def models(self) -> list[str]:
        return sorted({m for m, _ in self._status} | set(self._table))

    def loaded(self) -> list[Loaded]:
        return [lv for versions in self._table.values() for lv in versions.values()]

    def index(self) -> list[dict[str, str]]:
        return [
            {"name": m, "version": v, "state": s.state, "reason": s.reason}
            for (m, v), s in sorted(
                self._status.items(), key=lambda kv: (kv[0][0], version_key(kv[0][1]))
            )
        ]

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(model)`` after every change to a model's ready versions."""
        self._listeners.append(listener)

    # -- changes ----------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load the whole repository; a version that fails is reported FAILED in the index."""
        for model in list_models(self.root):
            # each failure is logged and kept in the index; the other models still load
            with contextlib.suppress(BadRequest):
                await self.load(model)

    async def load(self, model: str, versions: list[str] | None = None) -> None:
        """Load (or reload when the file changed) versions found on disk.

        ``versions=None`` means the model as the repository has it now: every version folder is
        loaded and loaded versions whose folder disappeared are unloaded. Raises BadRequest
        naming each version that failed, once every version was tried: a new version is then
        FAILED, a loaded one keeps serving the file it had.
        """
        check_model_name(model)
        on_disk = list_versions(self.root, model)
        if versions is None:
            if not on_disk and not self.known(model):
                raise NotFound(f"model {cut(model)!r} is not in the repository")
            targets, gone = on_disk, [v for v in self.ready_versions(model) if v not in on_disk]
        else:
            for v in versions:
                check_version_name(v)
                if v not in on_disk:
                    raise NotFound(f"model {cut(model)!r} has no version {v} in the repository")
            targets, gone = versions, []
        failures: list[str] = []
        async with self._lock(model):
            for version in targets:
                reason = await self._load_one(model, version)
                if reason is not None:
                    failures.append(f"version {version}: {reason}")
            if gone:
                await self._unload(model, gone)
            if versions is None:  # forget versions whose folders are gone
                for key in [k for k in self._status if k[0] == model and k[1] not in on_disk]:
                    if self._status[key].state in ("FAILED", "UNAVAILABLE"):
                        del self._status[key]
        if failures:
            raise BadRequest(f"failed to load model {cut(model)!r}: {'; '.join(failures)}")

    async def unload(self, model: str, versions: list[str] | None = None) -> None:
        """Stop routing to the versions, wait for their in-flight requests, then free them."""
        check_model_name(model)
        if not self.known(model):
            raise NotFound(f"unknown model {cut(model)!r}")
        if versions is not None:
            for v in versions:
                check_version_name(v)
                if (model, v) not in self._status:
                    raise NotFound(f"unknown version {cut(v)!r} of model {cut(model)!r}")
        async with self._lock(model):
            await self._unload(model, versions or self.ready_versions(model))

    async def close(self) -> None:
        for model in list(self._table):
            await self.unload(model)

    # -- internals --------------------------------------------------------------------------
    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def _load_one(self, model: str, version: str) -> str | None:
        """Load or reload one version; the reason it failed, or None."""
        versions = self._table.get(model)
        current = versions.get(version) if versions is not None else None
        loop = asyncio.get_running_loop()
        try:
            folder = version_folder(self.root, model, version)
            if current is None:
                self._status[(model, version)] = Status("LOADING")
            info, runtime, monitor = await loop.run_in_executor(
                self._executor, self._loader, model, version, folder
            )
        except (LoadError, BadRequest) as exc:
            reason = exc.message if isinstance(exc, BadRequest) else str(exc)
            log.warning("model %s version %s failed to load: %s", model, version, reason)
            self.emit(
                "model.failed",
                f"{model}/{version}",
                {"version": version, "reason": cut(reason, 1000), "replica": self.replica,
                 "serving": current.info.sha256 if current is not None else None},
            )  # fmt: skip
            if current is None:
                self._status[(model, version)] = Status("FAILED", reason)
                return reason
            # keep serving what was loaded; report why the reload failed
            self._status[(model, version)] = Status("READY", f"reload failed: {reason}")
            return f"reload failed, still serving the file loaded before: {reason}"
        if current is not None and current.info.sha256 == info.sha256:
            runtime.close()
            return None
        self._publish(
            model, {**(self._table.get(model) or {}), version: Loaded(info, runtime, monitor)}
        )
        self._status[(model, version)] = Status("READY")
        log.info("model %s version %s ready (sha256 %s)", model, version, info.sha256[:12])
        self.emit(
            "model.loaded",
            f"{model}/{version}",
            {"version": version, "sha256": info.sha256, "replica": self.replica,
             "replaced": current.info.sha256 if current is not None else None},
        )  # fmt: skip
        if current is not None:
            await current.drain()
            current.runtime.close()
        return None

    async def _unload(self, model: str, versions: list[str]) -> None:
        table = dict(self._table.get(model, {}))
        removed = [table.pop(v) for v in versions if v in table]
        for v in versions:
            self._status[(model, v)] = Status("UNLOADING")
        self._publish(model, table)
        for loaded in removed:
            await loaded.drain()
            loaded.runtime.close()
        for v in versions:
            self._status[(model, v)] = Status("UNAVAILABLE", "unloaded")
            log.info("model %s version %s unloaded", model, v)
        for loaded in removed:
            info = loaded.info
            self.emit(
                "model.unloaded",
                f"{model}/{info.version}",
                {"version": info.version, "sha256": info.sha256, "replica": self.replica},
            )

    def _publish(self, model: str, versions: dict[str, Loaded]) -> None:
        table = dict(self._table)
        if versions:
            table[model] = MappingProxyType(versions)
        else:
            table.pop(model, None)
        latest = {m: vs[max(vs, key=version_key)] for m, vs in table.items()}
        self._table, self._latest = MappingProxyType(table), MappingProxyType(latest)
        for listener in self._listeners:
            listener(model)
