"""FastAPI dependencies: settings, the model holder, the batcher, and token checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from guardloop.service.batcher import MicroBatcher
from guardloop.service.guideline_store import GuidelineStore
from guardloop.service.model_holder import ModelHolder
from guardloop.service.pool_writer import PoolLogger

from guardloop.core.settings import Settings
from guardloop.storage import Database, StorageError


# The lookups below are `async def` although they never wait: FastAPI runs a plain `def` dependency in a worker
# thread, and those hand-offs (and the GIL contention they cause) were the largest cost of a /classify request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def get_guidelines(request: Request) -> GuidelineStore:
    return request.app.state.guidelines


def get_database(request: Request) -> Database:
    """The pool/review database, migrated; 503 while it cannot be reached. Sync: FastAPI runs it in a thread."""
    database: Database = request.app.state.database
    try:
        database.ensure_schema()
    except StorageError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable; retry shortly") from exc
    return database


async def get_pool_logger(request: Request) -> PoolLogger | None:
    return getattr(request.app.state, "pool", None)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    expected = settings.admin_token_value
    if not expected:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin endpoints are disabled: set GUARDLOOP_ADMIN_TOKEN")
    token = bearer_token(authorization)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing admin token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
HolderDep = Annotated[ModelHolder, Depends(get_holder)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
GuidelinesDep = Annotated[GuidelineStore, Depends(get_guidelines)]
DatabaseDep = Annotated[Database, Depends(get_database)]
PoolLoggerDep = Annotated[PoolLogger | None, Depends(get_pool_logger)]
