"""The ops page (GET /ops) and the latest pool map (GET /admin/ops/pool-map.png, admin token).

The trainer draws the map (trainer/pool_map.py) into the ops directory, on the registry volume that every
replica mounts; the service only serves the file, so it needs neither the trainer nor matplotlib. The page holds
no data: its script asks for the admin token (kept in sessionStorage, sent as a Bearer header, never in a URL)
and shows the image from a blob URL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse
from guardloop.service.deps import require_admin
from guardloop.service.routers.review_page import PAGE_HEADERS, STATIC_DIR, TEMPLATES
from guardloop.service.schemas import ErrorResponse

from guardloop.core.settings import Settings

# The review page's policy, plus blob: images (the map arrives through fetch, with the token in a header).
OPS_HEADERS = PAGE_HEADERS | {
    "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"].replace("img-src 'self'", "img-src 'self' blob:")
}

router = APIRouter(tags=["ops"])


def _settings(request: Request) -> Settings:
    return request.app.state.settings


@router.get("/ops", response_class=HTMLResponse, include_in_schema=False)
def ops_page() -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template("ops.html").render(), headers=OPS_HEADERS)


@router.get("/ops/assets/ops.js", include_in_schema=False)
def ops_script() -> FileResponse:
    return FileResponse(STATIC_DIR / "ops.js", media_type="text/javascript; charset=utf-8", headers=OPS_HEADERS)


@router.get(
    "/admin/ops/pool-map.png",
    dependencies=[Depends(require_admin)],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "the latest pool map"},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
    },
    summary="The latest pool map the trainer drew (PNG)",
)
def pool_map(settings: Annotated[Settings, Depends(_settings)]) -> FileResponse:
    path = settings.pool_map_path
    try:
        drawn = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    except FileNotFoundError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"no pool map in {path.parent} yet: the trainer draws one after each drift check "
            "(GUARDLOOP_DRIFT_CHECK_MINUTES, GUARDLOOP_POOL_MAP_ITEMS); `guardloop pool map --output` draws one now",
        ) from None
    headers = {"Cache-Control": "no-store", "X-Drawn-At": drawn.isoformat(timespec="seconds")}
    return FileResponse(path, media_type="image/png", headers=headers)
