"""GET /admin/policies: the tenant policies this replica decides with, and the last refused policy file."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from guardloop.service.deps import require_admin
from guardloop.service.policy_store import PolicyStore
from guardloop.service.schemas import ErrorResponse
from pydantic import BaseModel, Field

router = APIRouter(tags=["policies"])


class RefusedPolicyOut(BaseModel):
    source: str
    reason: str
    at: str


class PoliciesResponse(BaseModel):
    version: str = Field(description="the policy file's version ('builtin': no file, everyone gets today's rules)")
    source: str = Field(description="the file it was loaded from, or 'builtin'")
    loaded_at: str
    refused: RefusedPolicyOut | None = Field(
        description="the last policy file that was refused (the policy above still decides), if any"
    )
    warnings: list[str] = Field(description="what in the file will not work as written (e.g. unknown clients)")
    default: dict[str, Any] = Field(description="the policy of every caller no tenant names")
    tenants: dict[str, Any] = Field(description="tenant name -> its clients, thresholds, review band, ...")


def get_policies(request: Request) -> PolicyStore:
    return request.app.state.policies


@router.get(
    "/admin/policies",
    response_model=PoliciesResponse,
    dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    summary="The tenant policies in force (names API-key clients: admin only) and the last refused file",
)
async def list_policies(store: Annotated[PolicyStore, Depends(get_policies)]) -> PoliciesResponse:
    current, refused = store.current, store.refused
    data = current.file.model_dump(mode="json") if current.file else {"default": {}, "tenants": {}}
    return PoliciesResponse(
        version=current.version,
        source=current.source,
        loaded_at=current.loaded_at.isoformat(),
        refused=RefusedPolicyOut(source=refused.source, reason=refused.reason, at=refused.at.isoformat())
        if refused
        else None,
        warnings=list(current.warnings),
        default=data["default"],
        tenants=data["tenants"],
    )
