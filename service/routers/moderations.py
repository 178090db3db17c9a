"""OpenAI-compatible moderation: existing clients switch to guardloop by changing their base URL."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from guardloop.service.auth import CLIENT_ID_HEADER_DOC, client_identity
from guardloop.service.classification import classify_texts
from guardloop.service.errors import OpenAIErrorRoute
from guardloop.service.model_json import ModelJSONResponse
from guardloop.service.schemas import ErrorResponse, ModerationRequest, ModerationResponse, ModerationResult

from guardloop.core.labels import LABELS, SAFE_LABEL

router = APIRouter(tags=["openai-compatible"], route_class=OpenAIErrorRoute)

MODEL_VERSION_HEADER = "X-Guardloop-Model-Version"


@router.post(
    "/v1/moderations",
    response_model=ModerationResponse,
    # The same API keys as /classify; OpenAI clients send theirs as `Authorization: Bearer <key>`.
    dependencies=[Depends(client_identity)],
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
    summary="OpenAI-compatible moderation over guardloop's six labels",
    openapi_extra=CLIENT_ID_HEADER_DOC,
    description=(
        "Takes OpenAI's request (`input`: a string or a list of strings; `model` optional) and answers in "
        "OpenAI's shape. `categories` and `category_scores` carry guardloop's labels; a category is true when its "
        "score reaches its threshold (`not-harmful` never is). The served model version is always in the "
        f"`{MODEL_VERSION_HEADER}` header."
    ),
)
async def create_moderation(body: ModerationRequest, request: Request) -> ModelJSONResponse:
    classified = await classify_texts(request, body.as_list())
    results = [
        ModerationResult(
            flagged=verdict.flagged,  # the tenant's block decision (service/decisions.py)
            categories={label: label != SAFE_LABEL and label in verdict.flagged_categories for label in LABELS},
            category_scores=verdict.scores,
            decision=decision.decision,
            category_decisions=decision.categories,
        )
        for verdict, decision in zip(classified.verdicts, classified.decisions, strict=True)
    ]
    response = ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=body.model or classified.model.version,
        results=results,
        policy_version=classified.policy.version,
    )
    # validated as it was built: written once (service/model_json.py)
    return ModelJSONResponse(response, headers={MODEL_VERSION_HEADER: classified.model.version})
