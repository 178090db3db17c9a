"""The FastAPI application: routers, the loaded model behind one swap point, and the registry watcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from guardloop.models.registry import ModelRegistry
from guardloop.service.batcher import MicroBatcher
from guardloop.service.classify_fast_path import ClassifyFastPath
from guardloop.service.docs import add_offline_docs
from guardloop.service.errors import describe_validation_error, document_validation_errors_as_text, http_error_response
from guardloop.service.guideline_store import GuidelineStore, poll_forever
from guardloop.service.limits import BodySizeLimit
from guardloop.service.memory import settle_garbage_collector
from guardloop.service.model_holder import ModelHolder
from guardloop.service.policy_store import PolicyStore
from guardloop.service.rate_limit import RateLimit, TokenBuckets, WorkLimit, build_groups
from guardloop.service.rollout_monitor import serve_rollout
from guardloop.service.routers import (
    classify,
    guidelines,
    health,
    model_versions,
    moderations,
    ops,
    policies,
    pool,
    prometheus,
    review,
    review_page,
)
from guardloop.service.security_headers import SecurityHeaders
from guardloop.service.service_metrics import HttpMetrics
from guardloop.service.storage_lifespan import open_storage
from guardloop.service.workers import forget_this_process
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardloop import __version__
from guardloop.core import telemetry
from guardloop.core.settings import Settings

log = logging.getLogger(__name__)


async def watch_registry(holder: ModelHolder, interval: float) -> None:
    """Follow the registry's `current` pointer, so a promotion anywhere reaches this replica."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(holder.follow_registry)
        except Exception:  # keep watching whatever one poll did; the holder already logged the reason
            log.exception("registry poll failed")


def create_app(settings: Settings | None = None, *, settle_gc: bool = False) -> FastAPI:
    """The service. `settle_gc`: a serving process (guardloop serve, its workers) freezes what start-up built out
    of the garbage collector's reach (service/memory.py); process-wide, so never in a test's process."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # First: a broken policy file stops the start-up before any thread runs (service/policy_store.py).
        policy_store = await asyncio.to_thread(PolicyStore, settings.policy_path, known_clients=settings.api_keys)
        registry = ModelRegistry(settings.registry_dir)
        holder = ModelHolder(
            registry,
            threads=settings.onnx_threads,
            max_seq_len=settings.max_seq_len,
            threshold_overrides=settings.thresholds,
        )
        await asyncio.to_thread(holder.follow_registry)
        if holder.current is None:
            log.warning("no servable model in %s yet; /readyz stays 503 until one is published", settings.registry_dir)
        batcher = MicroBatcher(
            lambda: holder.current,
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            max_tokens=settings.batch_max_tokens,
            max_queue_tokens=settings.queue_max_tokens,
            max_seq_len=settings.max_seq_len,
            short_lane=settings.batch_short_lane,
            on_batch=telemetry.BATCH_SIZE.observe,
        )
        batcher.start()
        app.state.settings, app.state.holder, app.state.batcher = settings, holder, batcher
        app.state.policies = policy_store
        app.state.guidelines = guideline_store = await asyncio.to_thread(GuidelineStore, settings.guidelines_path)
        watcher = asyncio.create_task(watch_registry(holder, settings.registry_poll_seconds))
        guideline_watcher = asyncio.create_task(
            poll_forever(guideline_store.poll, settings.guidelines_poll_seconds, "guideline")
        )
        policy_watcher = asyncio.create_task(poll_forever(policy_store.poll, settings.policy_poll_seconds, "policy"))
        try:
            # the database, the pool writer, the retention purge; then the roll-out (shadow, canary)
            async with open_storage(app, settings), serve_rollout(app, settings):
                if settle_gc:
                    settle_garbage_collector()
                yield
        finally:
            for task in (watcher, guideline_watcher, policy_watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await batcher.stop()
            forget_this_process()

    app = FastAPI(
        title="guardloop",
        version=__version__,
        description="Safety classifier for chatbots: six labels with scores, from a model that keeps learning.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN; add_offline_docs serves local ones
        redoc_url=None,
        # The service's metrics are Prometheus' (/metrics). FastAPI's native OpenTelemetry looked up three
        # OpenTelemetry providers on every request to find none configured: 12 of /classify's ~1,200 calls.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    # The classifying routes first: a request is matched against the routes in order, and these take nearly all
    # of the traffic.
    app.include_router(classify.router)
    app.include_router(moderations.router)
    add_offline_docs(app)
    # Innermost: inside every limit and the metrics, in front of FastAPI (service/classify_fast_path.py).
    app.add_middleware(ClassifyFastPath)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Around the body-size limit: a flood is refused before its bodies are read or its tokens looked up.
    app.add_middleware(
        RateLimit,
        groups=build_groups(
            classify_per_ip=settings.rate("rate_limit_classify_per_ip"),
            classify_per_key=settings.rate("rate_limit_classify_per_key"),
            review_per_ip=settings.rate("rate_limit_review_per_ip"),
            review_per_token=settings.rate("rate_limit_review_per_token"),
        ),
        auth_failures=TokenBuckets(rate) if (rate := settings.rate("rate_limit_auth_failures_per_ip")) else None,
    )
    work_rate = settings.rate("rate_limit_classify_tokens_per_client")
    app.state.work_limit = WorkLimit(work_rate, max_seq_len=settings.max_seq_len) if work_rate else None
    if settings.cors_origins:  # closed by default: without CORS headers browsers refuse cross-site calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Client-Id"],
        )
    app.add_middleware(SecurityHeaders)  # on every answer, the 413s and 429s above included
    app.add_middleware(HttpMetrics)  # outermost: it also times and counts what the body-size limit refuses
    telemetry.expose_service_metrics()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return http_error_response(exc)

    document_validation_errors_as_text(app)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation_error(exc)}, status_code=422)

    app.include_router(health.router)
    app.include_router(prometheus.router)
    app.include_router(guidelines.router)
    app.include_router(policies.router)
    app.include_router(model_versions.router)
    app.include_router(review.router)
    app.include_router(review_page.router)
    app.include_router(pool.router)
    app.include_router(ops.router)
    return app


def create_worker_app() -> FastAPI:
    """uvicorn's app factory in each of several worker processes (service/workers.py). Workers are spawned, not
    forked: each reads the environment the parent checked, and sets its own thread switch interval (process-wide,
    as `guardloop serve` does for a single process)."""
    settings = Settings()
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    return create_app(settings, settle_gc=True)
