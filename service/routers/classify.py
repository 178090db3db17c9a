from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from guardloop.models.onnx_model import Verdict
from guardloop.service.auth import CLIENT_ID_HEADER_DOC, client_identity
from guardloop.service.classification import check_limits, classify_texts
from guardloop.service.conversation import conversation_texts, pick_verdict
from guardloop.service.decisions import AppliedPolicy, Decision
from guardloop.service.guideline_store import GuidelineStore
from guardloop.service.model_json import ModelJSONResponse
from guardloop.service.schemas import Classification, ClassifyRequest, ClassifyResponse, ErrorResponse

from guardloop.core.policy import ALLOW
from guardloop.core.settings import Settings

__all__ = ["check_limits", "router"]

router = APIRouter(tags=["classify"])


def _classification(
    verdict: Verdict, decision: Decision, text: str, policy: AppliedPolicy, guidelines: GuidelineStore
) -> Classification:
    # Guidance for what blocks and for what asks for review: a borderline text gets a softer, guided answer.
    guided = [category for category, name in decision.categories.items() if name != ALLOW]
    library = policy.guidelines or guidelines.current.library
    guidance = library.guidance_for(guided, text) if guided else []
    return Classification(
        **verdict.__dict__,
        guidance=guidance,
        decision=decision.decision,
        category_decisions=decision.categories,
    )


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    dependencies=[Depends(client_identity)],
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
    summary="Classify one or more user messages, or the last user turn of a conversation",
    openapi_extra=CLIENT_ID_HEADER_DOC,
)
async def classify(body: ClassifyRequest, request: Request) -> ModelJSONResponse:
    # From app state, as classify_texts reads them: as FastAPI dependencies they were two more dependency solves
    # per request on the hottest route (1,406 -> 1,250 Python function calls per request without them, cProfile).
    settings: Settings = request.app.state.settings
    guidelines: GuidelineStore = request.app.state.guidelines
    if body.messages is not None:
        conversation = conversation_texts(
            body.messages, context_turns=settings.conversation_context_turns, max_chars=settings.max_text_chars
        )
        with_window = conversation.window is not None and settings.max_texts >= 2
        texts = [conversation.turn, conversation.window or ""] if with_window else [conversation.turn]
        classified = await classify_texts(request, texts, pooled=1)  # the window is not a user message
        verdict, by_context = pick_verdict(classified.verdicts[0], classified.verdicts[1] if with_window else None)
        # Topic keywords are looked up in the text that was judged (as the model read it): with the context when
        # it decided.
        judged = classified.canonical[1] if by_context else classified.canonical[0]
        decision = classified.decisions[1] if by_context else classified.decisions[0]
        result = _classification(verdict, decision, judged, classified.policy, guidelines)
        results = [result.model_copy(update={"decided_by_context": by_context})]
    else:
        classified = await classify_texts(request, body.as_list())
        results = [
            _classification(v, d, t, classified.policy, guidelines)
            for v, d, t in zip(classified.verdicts, classified.decisions, classified.canonical, strict=True)
        ]
    response = ClassifyResponse(
        request_id=uuid.uuid4().hex,
        model_version=classified.model.version,
        policy=classified.policy.name,
        policy_version=classified.policy.version,
        results=results,
    )
    return ModelJSONResponse(response)  # validated as it was built: written once (service/model_json.py)
