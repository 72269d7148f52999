"""create_app(settings) -> Starlette: routes, the one error mapping, and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.background.drift_events import DriftWatcher
from gateway.background.events import Events, read_sinks
from gateway.background.fleet import CountsExchange
from gateway.background.guards import GuardEvaluator
from gateway.background.prediction_sinks import prediction_log
from gateway.background.quality import Quality
from gateway.background.rollout import RolloutEngine
from gateway.background.shadow import ShadowRunner
from gateway.http.access import Access, AdminRoute
from gateway.http.admin import Admin
from gateway.http.auth import TokenAuth, key_check
from gateway.http.endpoints import Endpoints
from gateway.http.inference import Inference, infer_target
from gateway.http.limits import Limits, read_limits
from gateway.http.metrics import (
    ClientCollector,
    EventsCollector,
    GatewayCollector,
    PredictionLogCollector,
    QualityCollector,
)
from gateway.http.openapi import openapi_document
from gateway.http.outcomes import OutcomesEndpoints
from gateway.http.responses import HANDLERS, json_response
from gateway.http.rollouts import RolloutAdmin, RolloutCollector
from gateway.http.triton import Triton
from gateway.serving.backlog import STATE_KEY, Backlog
from gateway.serving.loader import version_loader
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, Traffic
from gateway.settings import Settings
from monitors import warm_up
from router.state.outbox import FileOutbox, MemoryOutbox, Outbox
from router.state.outcomes import MemoryPredictions, PredictionStore
from router.state.store import MemoryStore, StateStore
from router.state.table import RouteTable

log = logging.getLogger("turnout")


class Gateway(Starlette):
    """Starlette, with the inference path in front of its router and middleware: a ``POST`` to
    ``/v2/models/{model}[/versions/{version}]/infer`` goes straight to ``Inference.serve``
    (gateway.http.inference says why); everything else, and any scope with a ``root_path``, takes
    the starlette routes, which reach the same ``Inference`` for inference paths."""

    def __init__(self, inference: Inference, backlog: Backlog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inference = inference
        self.backlog = backlog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.backlog.begun += 1
            if scope["method"] == "POST" and not scope.get("root_path"):
                target = infer_target(scope["path"])
                if target is not None:
                    await self.inference.serve(scope, receive, send, *target)
                    return
        await super().__call__(scope, receive, send)


def open_store(redis_url: str | None, prefix: str = "turnout:") -> StateStore:
    """The routing state store: Redis when configured, else the process's own memory."""
    if not redis_url:
        return MemoryStore()
    from router.state.redis_store import RedisStore  # only deployments with Redis import redis

    return RedisStore(redis_url, prefix)


def open_outbox(settings: Settings) -> Outbox:
    """The event outbox: a Redis stream when Redis is configured, else a file under
    ``events_dir``, else the process's memory."""
    if settings.redis_url:
        from router.state.redis_outbox import RedisOutbox

        prefix = settings.redis_prefix + "events:"
        return RedisOutbox(
            settings.redis_url, prefix, settings.events_max, settings.events_max_bytes
        )
    if settings.events_dir is not None:
        return FileOutbox(settings.events_dir, settings.events_max, settings.events_max_bytes)
    return MemoryOutbox(settings.events_max, settings.events_max_bytes)


def open_predictions(settings: Settings) -> PredictionStore:
    """The outcome join's store: Redis when configured (the fleet's), else bounded memory."""
    if not settings.redis_url:
        return MemoryPredictions(
            settings.outcome_ttl_s, settings.outcome_max_entries, settings.outcome_max_bytes
        )
    from router.state.redis_outcomes import RedisPredictions

    return RedisPredictions(settings.redis_url, settings.redis_prefix, settings.outcome_ttl_s)


def create_app(settings: Settings) -> Gateway:
    executor = ThreadPoolExecutor(settings.execution_threads, thread_name_prefix="turnout-run")

    outbox = open_outbox(settings)
    events = Events(
        outbox,
        read_sinks(settings.event_sinks) if settings.event_sinks is not None else (),
        source=settings.event_source,
        tick_s=settings.events_tick_s,
        lease_ttl_s=settings.lease_ttl_s,
    )
    backlog = Backlog()
    registry = Registry(
        settings.model_repository,
        version_loader(settings, executor, backlog.busy),
        emit=events.emit,
    )
    store = open_store(settings.redis_url, settings.redis_prefix)
    table = RouteTable(
        store,
        emit=events.emit,
        shared=settings.redis_url is not None,
        feedback_ttl_s=settings.feedback_ttl_s,
        flush_s=settings.flush_s,
        feedback_max_entries=settings.feedback_max_entries,
        feedback_max_bytes=settings.feedback_max_bytes,
    )
    shadows = ShadowRunner(registry, settings.max_shadow_inflight, busy=backlog.busy)
    auth = TokenAuth(settings.admin_tokens, settings.admin_token_expiry)
    access = Access(auth, settings.admin_token_grants)
    traffic = Traffic()
    keys = key_check(settings.api_keys, settings.api_key_expiry)
    # Feedback takes its own keys when they are configured, else the API keys.
    feedback_keys = (
        key_check(settings.feedback_keys, settings.feedback_key_expiry, what="feedback key")
        if settings.feedback_keys
        else keys
    )
    exchange = CountsExchange(
        store,
        registry,
        traffic,
        shared=settings.redis_url is not None,
        workers=settings.workers,
        interval_s=settings.publish_s,
        monitors=settings.monitors,
    )
    quality = Quality(
        registry,
        open_predictions(settings),
        window_s=settings.quality_window_s,
        flush_s=settings.flush_s,
        exchange=exchange,
        emit=events.emit,
    )
    guard_metrics = GuardMetrics()
    guards = GuardEvaluator(
        table,
        registry,
        shadows,
        traffic,
        guard_metrics,
        tick_s=settings.guard_tick_s,
        lease_ttl_s=settings.lease_ttl_s,
        emit=events.emit,
        quality=quality,
    )
    drift_watch = DriftWatcher(
        registry,
        exchange,
        store,
        outbox,
        events.emit,
        tick_s=settings.drift_events_s,
        lease_ttl_s=settings.lease_ttl_s,
    )
    rollouts = RolloutEngine(
        table,
        registry,
        guards,
        emit=events.emit,
        tick_s=settings.guard_tick_s,
        lease_ttl_s=settings.lease_ttl_s,
    )
    limits = Limits(
        store,
        settings.api_keys,
        read_limits(settings.limits) if settings.limits is not None else None,
        shared=settings.redis_url is not None,
        period_s=settings.publish_s,
    )
    ep = Endpoints(settings, registry, table, access, keys, exchange, feedback_keys)
    predictions = prediction_log(settings)  # None: off for every model
    record = None if predictions is None else predictions.offer
    triton = Triton(settings, registry, keys, exchange)
    inference = Inference(
        settings, registry, table, shadows, traffic, keys, limits, record, quality=quality
    )
    outcomes = OutcomesEndpoints(quality, keys, feedback_keys)
    admin = Admin(
        access, registry, table, shadows, guards, limits, monitors=settings.monitors, events=events
    )
    metrics_registry = CollectorRegistry(auto_describe=False)
    collector = GatewayCollector(registry, table, shadows, guard_metrics)
    metrics_registry.register(collector)
    metrics_registry.register(ClientCollector(limits))
    quality_collector = QualityCollector(registry, quality)
    metrics_registry.register(quality_collector)
    if predictions is not None:
        metrics_registry.register(PredictionLogCollector(predictions))
    metrics_registry.register(RolloutCollector(rollouts))
    rollout_admin = RolloutAdmin(access, registry, rollouts, monitors=settings.monitors)
    metrics_registry.register(EventsCollector(events))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async def start() -> None:
            # Compile (or load from the cache) every kernel before any request can need one.
            await asyncio.get_running_loop().run_in_executor(None, warm_up)
            await events.start()
            await registry.load_all()
            table.start()
            await table.synced.wait()
            quality.start()
            guards.start()
            rollouts.start()
            exchange.start()
            limits.start()
            if settings.monitors:
                drift_watch.start()
            # Everything loaded so far (numba, scipy, sessions) lives as long as the process:
            # keep it out of the collector's full passes, which otherwise stall the loop for
            # 100+ ms under load.
            gc.collect()
            gc.freeze()
            registry.started = True
            log.info("ready: %d model versions loaded", len(registry.loaded()))

        if predictions is not None:
            predictions.start()
        # Loading runs in the background so liveness answers while large models load.
        task = asyncio.create_task(start())
        if settings.workers > 1:
            # Workers share one listening socket and uvicorn accepts once this yields: a worker
            # restarted after a crash would take its share of requests before it could serve.
            await task
        try:
            yield {STATE_KEY: backlog}  # for the HTTP protocol (gateway.serving.backlog)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await guards.stop()
            await rollouts.stop()
            await drift_watch.stop()
            await exchange.stop()
            await quality.stop()
            await limits.stop()
            await table.stop()
            await shadows.close()
            await store.close()
            await registry.close()
            await events.stop()  # last: the events of the shutdown itself reach the outbox
            executor.shutdown(wait=True)
            inference.close()
            if predictions is not None:  # writes what is queued: a join of up to a second
                await asyncio.get_running_loop().run_in_executor(None, predictions.stop)

    async def openapi(request: Request) -> Response:
        document = openapi_document(bool(settings.api_keys), bool(settings.feedback_keys))
        return json_response(document)

    async def metrics(request: Request) -> Response:
        # The process group's counts: the same figures whichever worker answers the scrape.
        collector.view = await exchange.view("group")
        quality_collector.view = (await quality.view("window", "fleet"))[0]
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        # Inference normally never reaches the router (see Gateway); listed for the rest.
        Route("/v2/models/{model}/infer", inference, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", inference, methods=["POST"]),
        Route("/v2/health/live", ep.live, methods=["GET"]),
        Route("/v2/health/ready", ep.ready, methods=["GET"]),
        Route("/v2", ep.server_metadata, methods=["GET"]),
        Route("/v2/models", triton.models, methods=["GET"]),
        # before /v2/models/{model}: as in Triton, "stats" here is the statistics of all models
        Route("/v2/models/stats", triton.stats, methods=["GET"]),
        Route("/v2/models/{model}/stats", triton.stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", triton.stats, methods=["GET"]),
        Route("/v2/models/{model}/config", triton.config, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/config", triton.config, methods=["GET"]),
        Route("/v2/models/{model}", ep.model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", ep.model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", ep.model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", ep.model_ready, methods=["GET"]),
        Route("/v2/models/{model}/feedback", ep.feedback, methods=["POST"]),
        Route("/v2/models/{model}/outcomes", outcomes.post, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/quality", outcomes.report, methods=["GET"]),
        AdminRoute("POST", "/v2/repository/index", ep.repository_index),
        AdminRoute("POST", "/v2/repository/models/{model}/load", ep.repository_load),
        AdminRoute("POST", "/v2/repository/models/{model}/unload", ep.repository_unload),
        AdminRoute("GET", "/admin/routes", admin.list_routes),
        AdminRoute("GET", "/admin/routes/{model}", admin.get_route),
        AdminRoute("PUT", "/admin/routes/{model}", admin.put_route),
        AdminRoute("DELETE", "/admin/routes/{model}", admin.delete_route),
        # before actions/{action}, which would take approve and reject for policy actions
        AdminRoute("POST", "/admin/routes/{model}/actions/approve", rollout_admin.approve),
        AdminRoute("POST", "/admin/routes/{model}/actions/reject", rollout_admin.reject),
        AdminRoute("POST", "/admin/routes/{model}/actions/{action}", admin.action),
        AdminRoute("GET", "/admin/routes/{model}/rollout", rollout_admin.get),
        AdminRoute("PUT", "/admin/routes/{model}/rollout", rollout_admin.put),
        AdminRoute("DELETE", "/admin/routes/{model}/rollout", rollout_admin.delete),
        AdminRoute("GET", "/admin/routes/{model}/report", admin.report),
        AdminRoute("GET", "/admin/routes/{model}/guards", admin.guards_view),
        AdminRoute("GET", "/admin/audit", admin.audit),
        AdminRoute("GET", "/admin/events", admin.events_page),
        AdminRoute("GET", "/admin/limits", admin.get_limits),
        AdminRoute("PUT", "/admin/limits", admin.put_limits),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/drift", ep.drift, methods=["GET"]),
    ]
    app = Gateway(
        inference,
        backlog,
        routes=routes,
        lifespan=lifespan,
        exception_handlers=dict(HANDLERS),
    )
    app.state.endpoints = ep
    return app


def app_from_env() -> Gateway:
    """Factory for uvicorn (``--factory``): each worker process builds its app from the env."""
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return create_app(settings)
