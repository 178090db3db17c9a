"""The service's storage for its lifetime: the database, the pool logger and its writer thread, the purge job,
the database gauges of /metrics.

A database that is down at start-up does not stop the service: /classify serves, the pool writer buffers and
retries (it applies the migrations once the database answers), and /review answers 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI
from guardloop.service.pool_writer import PoolLogger, PoolSampler, PoolWriter
from guardloop.service.service_metrics import refresh_database_gauges

from guardloop.core.settings import Settings
from guardloop.storage import Database, PoolRepository, ReviewRepository, StorageError

log = logging.getLogger(__name__)


def build_pool_logger(settings: Settings, database: Database) -> PoolLogger:
    repository = PoolRepository(database, redact_contacts=settings.pool_redact)
    writer = PoolWriter(
        repository.write_batch,
        max_queued=settings.pool_queue_size,
        batch_size=settings.pool_batch_size,
        flush_seconds=settings.pool_flush_seconds,
        prepare=database.ensure_schema,
    )
    sampler = PoolSampler(
        measure=settings.pool_uncertainty_measure,
        uncertainty_threshold=settings.pool_uncertainty_threshold,
        margin=settings.pool_margin,
        sample_rate=settings.pool_sample_rate,
        seed=settings.seed,
    )
    return PoolLogger(sampler, writer)


def purge_expired(database: Database, retention_days: float) -> int:
    """Delete unlabeled pool items not seen for `retention_days` (labeled ones are the training set and stay)."""
    database.ensure_schema()
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    return PoolRepository(database).purge(older_than=cutoff)


async def purge_periodically(database: Database, retention_days: float, interval: float) -> None:
    while True:
        try:
            removed = await asyncio.to_thread(purge_expired, database, retention_days)
            if removed:
                log.info("retention: purged %d pool items not seen for %g days", removed, retention_days)
        except StorageError as exc:
            log.warning("retention purge skipped: %s", exc)
        except Exception:  # keep the job alive whatever one run hit
            log.exception("retention purge failed")
        await asyncio.sleep(interval)


@asynccontextmanager
async def open_storage(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Sets app.state.database and app.state.pool (None when pool logging is off) for the app's lifetime."""
    database = Database(settings.database_url_value)
    try:
        await asyncio.to_thread(database.ensure_schema)
    except StorageError as exc:
        log.error("%s; serving /classify anyway, the pool writer retries", exc)
    pool = build_pool_logger(settings, database) if settings.pool_enabled else None
    if pool is not None:
        pool.writer.start()
    app.state.database, app.state.pool = database, pool
    purger = asyncio.create_task(
        purge_periodically(database, settings.pool_retention_days, settings.pool_purge_interval_seconds)
    )
    gauges = asyncio.create_task(
        refresh_database_gauges(
            database,
            ReviewRepository(
                database,
                labels_per_item=settings.review_labels_per_item,
                second_opinion_share=settings.review_second_opinion_share,
            ),
            settings.metrics_refresh_seconds,
        )
    )
    try:
        yield
    finally:
        for task in (purger, gauges):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pool is not None:
            await asyncio.to_thread(pool.writer.stop)
        database.dispose()
