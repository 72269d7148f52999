"""create_app(settings) -> Starlette: routes, the one error mapping, and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import codec
from gateway.admin import Admin
from gateway.auth import TokenAuth, key_check
from gateway.batcher import BatchConfig, BatchingRuntime
from gateway.endpoints import Endpoints, json_response
from gateway.errors import GatewayError, Overloaded, Unauthorized
from gateway.fleet import CountsExchange
from gateway.guards import GuardEvaluator
from gateway.metrics import GatewayCollector, GuardMetrics, Traffic
from gateway.models import ModelVersion, Runtime
from gateway.monitoring import fit_monitor
from gateway.openapi import openapi_document
from gateway.registry import Registry
from gateway.repository import files_inside
from gateway.runtime import LoadError, inline_rows, load_version
from gateway.settings import Settings
from gateway.shadow import ShadowRunner
from monitors import VersionMonitor, warm_up
from router.store import open_store
from router.table import RouteTable

log = logging.getLogger("turnout")


def create_app(settings: Settings) -> Starlette:
    executor = ThreadPoolExecutor(settings.execution_threads, thread_name_prefix="turnout-run")

    def loader(
        model: str, version: str, folder: Path
    ) -> tuple[ModelVersion, Runtime, VersionMonitor]:
        files_inside(settings.model_repository, folder)
        try:
            config = BatchConfig.from_file(folder / "config.json", batch_defaults)
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
        )
        return info, runtime, monitor

    batch_defaults = BatchConfig(
        enabled=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue=settings.max_queue,
    )
    registry = Registry(settings.model_repository, loader)
    store = open_store(settings.redis_url, settings.redis_prefix)
    table = RouteTable(
        store, shared=settings.redis_url is not None, feedback_ttl_s=settings.feedback_ttl_s
    )
    shadows = ShadowRunner(registry, settings.max_shadow_inflight)
    auth = TokenAuth(settings.admin_tokens, settings.admin_token_expiry)
    traffic = Traffic()
    keys = key_check(settings.api_keys, settings.api_key_expiry)
    ep = Endpoints(settings, registry, table, shadows, auth, traffic, keys)
    metrics_registry = CollectorRegistry(auto_describe=False)
    guard_metrics = GuardMetrics()
    collector = GatewayCollector(registry, table, shadows, guard_metrics)
    metrics_registry.register(collector)
    exchange = CountsExchange(
        store,
        registry,
        traffic,
        shared=settings.redis_url is not None,
        workers=settings.workers,
        monitors=settings.monitors,
    )
    ep.exchange = exchange
    admin = Admin(auth, registry, table, shadows, monitors=settings.monitors)
    ep.referenced = admin.referencing
    guards = GuardEvaluator(admin, traffic, guard_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def start() -> None:
            # Compile (or load from the cache) every kernel before any request can need one.
            await asyncio.get_running_loop().run_in_executor(None, warm_up)
            await registry.load_all()
            table.start()
            await table.synced.wait()
            guards.start()
            exchange.start()
            # Everything loaded so far (numba, scipy, sessions) lives as long as the process:
            # keep it out of the collector's full passes, which otherwise stall the loop for
            # 100+ ms under load.
            gc.collect()
            gc.freeze()
            ep.started = True
            log.info("ready: %d model versions loaded", len(registry.loaded()))

        # Loading runs in the background so liveness answers while large models load.
        task = asyncio.create_task(start())
        if settings.workers > 1:
            # Workers share one listening socket and uvicorn accepts once this yields: a worker
            # restarted after a crash would take its share of requests before it could serve.
            await task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await guards.stop()
            await exchange.stop()
            await table.stop()
            await shadows.close()
            await store.close()
            await registry.close()
            executor.shutdown(wait=True)

    async def openapi(request: Request) -> Response:
        return json_response(openapi_document(api_keys=bool(settings.api_keys)))

    async def metrics(request: Request) -> Response:
        # The process group's counts: the same figures whichever worker answers the scrape.
        collector.view = await exchange.view("group")
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        # Starlette tries routes in order: inference first, it is nearly all the traffic.
        Route("/v2/models/{model}/infer", ep.infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", ep.infer, methods=["POST"]),
        Route("/v2/health/live", ep.live, methods=["GET"]),
        Route("/v2/health/ready", ep.ready, methods=["GET"]),
        Route("/v2", ep.server_metadata, methods=["GET"]),
        Route("/v2/models/{model}", ep.model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", ep.model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", ep.model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", ep.model_ready, methods=["GET"]),
        Route("/v2/models/{model}/feedback", ep.feedback, methods=["POST"]),
        Route("/v2/repository/index", ep.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", ep.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", ep.repository_unload, methods=["POST"]),
        Route("/admin/routes", admin.list_routes, methods=["GET"]),
        Route("/admin/routes/{model}", admin.get_route, methods=["GET"]),
        Route("/admin/routes/{model}", admin.put_route, methods=["PUT"]),
        Route("/admin/routes/{model}", admin.delete_route, methods=["DELETE"]),
        Route("/admin/routes/{model}/actions/{action}", admin.action, methods=["POST"]),
        Route("/admin/routes/{model}/report", admin.report, methods=["GET"]),
        Route("/admin/routes/{model}/guards", guards.endpoint, methods=["GET"]),
        Route("/admin/audit", admin.audit, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/drift", ep.drift, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: gateway_error,
            HTTPException: http_error,
            RecursionError: too_deep,
            Exception: unexpected_error,
        },
    )
    app.state.endpoints = ep
    return app


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        codec.encode_error(message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    elif isinstance(exc, Unauthorized):
        # The reason only: never the header, which may hold a real token sent to the wrong place.
        client = request.client.host if request.client else "-"
        log.info("refused %s %s from %s: %s", request.method, request.url.path, client, exc.message)
    else:
        log.debug("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.message, headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # starlette's bare "Not Found" says nothing useful
        message = f"{message}: no route for {request.method} {request.url.path}"
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def too_deep(request: Request, exc: Exception) -> Response:
    """A client's JSON nested hundreds of levels (orjson accepts 1024) met code that recurses
    over it, such as a repr in a validation message: the client's mistake, not a fault."""
    log.warning("%s %s -> 400: nested too deeply (%s)", request.method, request.url.path, exc)
    return error_response(400, "request JSON is nested too deeply to process")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def app_from_env() -> Starlette:
    """Factory for uvicorn (``--factory``): each worker process builds its app from the env."""
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return create_app(settings)
