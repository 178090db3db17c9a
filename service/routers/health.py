from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from guardloop.service.deps import HolderDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="A model is loaded and requests can be answered")
async def readyz(holder: HolderDep) -> JSONResponse:
    if holder.current is None:
        return JSONResponse({"status": "not ready", "reason": "no model loaded"}, status_code=503)
    return JSONResponse({"status": "ready", "model_version": holder.version})
