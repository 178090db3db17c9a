"""Admin view of the pool: the writer's counters (written, duplicates, dropped, queued) and the table's size."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from guardloop.service.deps import DatabaseDep, PoolLoggerDep, require_admin
from guardloop.service.review_schemas import PoolStatusOut, PurgeOut, WriterCountersOut
from guardloop.service.schemas import ErrorResponse

from guardloop.storage import PoolRepository, StorageError

router = APIRouter(
    prefix="/admin/pool",
    tags=["pool"],
    dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)


@router.get("", response_model=PoolStatusOut, summary="Pool writer counters and pool size")
def pool_status(request: Request, pool: PoolLoggerDep) -> PoolStatusOut:
    writer = None
    if pool is not None:
        counters = pool.writer.counters()
        last_write = counters.last_write_at.isoformat() if counters.last_write_at else None
        writer = WriterCountersOut(**{**counters.__dict__, "last_write_at": last_write})
    # Counters must answer even with the database down: that is when they matter.
    database = request.app.state.database
    try:
        database.ensure_schema()
        stats, error = PoolRepository(database).stats().as_json(), None
    except StorageError as exc:
        stats, error = None, str(exc)
    return PoolStatusOut(enabled=pool is not None, writer=writer, pool=stats, database_error=error)


@router.post(
    "/purge",
    response_model=PurgeOut,
    responses={503: {"model": ErrorResponse}},
    summary="Delete unlabeled items not seen for the given days (default: the retention setting)",
)
def purge(
    request: Request,
    database: DatabaseDep,
    # At most 100 years: a larger age overflows the date arithmetic (a 500 that schemathesis found).
    older_than_days: Annotated[float | None, Query(gt=0, le=36_500)] = None,
) -> PurgeOut:
    days = older_than_days or request.app.state.settings.pool_retention_days
    cutoff = datetime.now(UTC) - timedelta(days=days)
    try:
        purged = PoolRepository(database).purge(older_than=cutoff)
    except StorageError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable; retry shortly") from exc
    return PurgeOut(purged=purged, older_than=cutoff.isoformat())
