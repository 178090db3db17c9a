"""The service's side of the metrics (objects: guardloop/core/telemetry.py): request metrics from an ASGI middleware,
and the gauges read from the shared database, refreshed in the background so a scrape never waits on it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardloop.core import telemetry
from guardloop.storage import Database, PoolRepository, ReviewRepository

log = logging.getLogger(__name__)


def route_template(scope: Scope) -> str:
    """`/review/items/{item_id}/label`, never the raw path, so the label set stays small."""
    route = scope.get("route")  # set by the router when a route was selected
    if route is not None:
        return route.path
    # Answered before routing (the body-size limit's 413) or by no route at all (404): find the template here.
    app = scope.get("app")
    template = _matching_template(getattr(getattr(app, "router", None), "routes", ()), scope.get("path", ""))
    return template or telemetry.UNMATCHED_ROUTE


def _matching_template(routes: Iterable[Any], path: str) -> str | None:
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            return route.path
        # FastAPI keeps an included router's routes behind a wrapper (`original_router`) in recent versions.
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner and (template := _matching_template(inner, path)):
            return template
    return None


class HttpMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            telemetry.record_http_request(route_template(scope), scope["method"], status, time.perf_counter() - started)


def read_database_gauges(database: Database, reviews: ReviewRepository) -> None:
    """Pool size, review queue depth and the oldest waiting item's age, from the database every replica shares.
    `reviews` is the queue as reviewers see it (labels per item, second opinions), so the depth counts the same."""
    database.ensure_schema()
    pool_size = PoolRepository(database).count()
    depth, oldest = reviews.waiting()
    age = max(0.0, (datetime.now(UTC) - oldest).total_seconds()) if oldest else 0.0
    telemetry.record_database_gauges(pool_size, depth, age)


async def refresh_database_gauges(database: Database, reviews: ReviewRepository, interval: float) -> None:
    """Keep the database gauges fresh; while the database is away they keep their last values (and say so once)."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(read_database_gauges, database, reviews)
            failing = False
        except Exception as exc:  # StorageError while the database is away; keep refreshing whatever one read hit
            if not failing:
                reason = (str(exc).strip().splitlines() or [""])[0]
                log.warning("database gauges keep their last values: %s: %s", type(exc).__name__, reason)
            failing = True
        await asyncio.sleep(interval)
