from __future__ import annotations

from fastapi import APIRouter
from guardloop.service.deps import GuidelinesDep
from guardloop.service.schemas import GuidelinesResponse, RefusedGuidelines

router = APIRouter(tags=["guidelines"])


@router.get(
    "/guidelines",
    response_model=GuidelinesResponse,
    summary="The guideline library /classify draws guidance from, and the last refused file if any",
)
async def list_guidelines(guidelines: GuidelinesDep) -> GuidelinesResponse:
    loaded, refused = guidelines.current, guidelines.refused
    return GuidelinesResponse(
        version=loaded.library.version,
        source=loaded.source,
        loaded_at=loaded.loaded_at.isoformat(),
        refused=RefusedGuidelines(source=refused.source, reason=refused.reason, at=refused.at.isoformat())
        if refused
        else None,
        description=loaded.library.description,
        categories=loaded.library.model_dump(mode="json")["categories"],
    )
