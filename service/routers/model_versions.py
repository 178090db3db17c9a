"""GET /models/current (the version this replica serves, its card) and POST /admin/reload (load the registry's
current version now): the service's view of the model versions the registry (guardloop.models) holds.

With several worker processes (GUARDLOOP_WORKERS) each request reaches one of them: the worker that answers
reload swaps now, the others at their next registry poll."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Request, status
from guardloop.models.registry import RegistryError
from guardloop.models.rollout import Rollouts
from guardloop.service.deps import HolderDep, SettingsDep, require_admin
from guardloop.service.schemas import ErrorResponse, ModelInfo, ReloadResponse, RolloutInfo

router = APIRouter(tags=["models"])


@router.get("/models/current", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
async def current_model(holder: HolderDep, settings: SettingsDep, request: Request) -> ModelInfo:
    loaded = holder.current
    if loaded is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded yet")
    card = loaded.card
    dev = (card.metrics or {}).get("dev") or {}
    return ModelInfo(
        version=card.version,
        created_at=card.created_at.isoformat(),
        loaded_at=loaded.loaded_at.isoformat(),
        load_seconds=round(loaded.load_seconds, 3),
        parent=card.parent,
        labels=card.labels,
        thresholds=loaded.classifier.thresholds,
        quantization=card.quantization,
        dev_macro_f1=dev.get("macro_f1"),
        limits={"max_texts": settings.max_texts, "max_text_chars": settings.max_text_chars},
        rollout=_rollout_info(holder, request),
    )


def _rollout_info(holder: HolderDep, request: Request) -> RolloutInfo | None:
    try:
        state = Rollouts(holder.registry).state()
    except (RegistryError, OSError):
        return None
    if state is None:
        return None
    monitor = getattr(request.app.state, "rollout", None)
    in_use = holder.shadow if state.stage == "shadow" else holder.canary
    return RolloutInfo(
        candidate=state.candidate,
        stage=state.stage,
        share=state.share,
        by=state.by,
        since=state.since.isoformat(),
        loaded=in_use is not None and in_use.version == state.candidate,
        halted=monitor.halt_reasons.get(state.candidate) if monitor else None,
    )


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
    summary="Load the registry's current version now (instead of waiting for the poll)",
)
async def reload_model(holder: HolderDep) -> ReloadResponse:
    result = await asyncio.to_thread(holder.follow_registry, force=True)
    if result is None:
        return ReloadResponse(serving=holder.version, swapped=False, reason="already serving the current version")
    if not result.swapped and result.version != holder.version:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"version {result.version} refused: {result.reason}; still serving {holder.version}",
        )
    return ReloadResponse(serving=holder.version, swapped=result.swapped, reason=result.reason)
