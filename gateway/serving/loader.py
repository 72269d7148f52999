"""How one version of a model becomes servable: its files checked, an onnxruntime session
built, its monitor fitted and a batching runtime put in front. The registry calls the loader
(``Registry(root, version_loader(...))``) for every version it loads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from gateway.errors import LoadError
from gateway.serving.batcher import BatchConfig, BatchingRuntime
from gateway.serving.monitoring import fit_monitor
from gateway.serving.registry import Loader
from gateway.serving.repository import files_inside
from gateway.serving.runtime import inline_rows, load_version
from gateway.serving.types import ModelVersion, Runtime
from gateway.settings import Settings
from monitors import VersionMonitor


def version_loader(settings: Settings, executor: Executor, busy: Callable[[], bool]) -> Loader:
    """The loader of a gateway with these settings; sessions run on ``executor``, and ``busy``
    says when requests wait for the event loop (gateway.serving.backlog)."""
    defaults = BatchConfig(
        enabled=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue=settings.max_queue,
    )

    def load(
        model: str, version: str, folder: Path
    ) -> tuple[ModelVersion, Runtime, VersionMonitor]:
        files_inside(settings.model_repository, folder)
        try:
            config = BatchConfig.from_file(folder / "config.json", defaults)
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        info, session = load_version(model, version, folder, settings, executor)
        if settings.monitors:
            monitor = fit_monitor(
                info, session, folder, settings.drift_window_s, settings.cache_dir
            )
        else:  # never fed: no reference to fit
            monitor = VersionMonitor.fit(None, {}, window_s=settings.drift_window_s)
        runtime = BatchingRuntime(
            session,
            info.inputs,
            executor,
            config,
            name=f"{model} v{version}",
            inline_rows=inline_rows(session.cost, settings.inline_threshold_us / 1e6),
            busy=busy,
            default_timeout_s=settings.request_timeout_ms / 1e3 or None,
        )
        return info, runtime, monitor

    return load
