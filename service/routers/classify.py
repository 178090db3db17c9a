from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, status

from service.batcher import NoModelLoaded
from service.deps import BatcherDep, SettingsDep
from service.schemas import Classification, ClassifyRequest, ClassifyResponse, ErrorResponse

router = APIRouter(tags=["classify"])


def check_limits(texts: list[str], max_texts: int, max_chars: int) -> None:
    if not texts:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "'texts' is empty: send at least one text")
    if len(texts) > max_texts:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"too many texts: {len(texts)} sent, at most {max_texts} per request; split the request",
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"text {i} is empty: send some words")
        if len(text) > max_chars:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"text {i} has {len(text)} characters, at most {max_chars} allowed; shorten it",
            )


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    summary="Classify one or more user messages",
)
async def classify(body: ClassifyRequest, settings: SettingsDep, batcher: BatcherDep) -> ClassifyResponse:
    texts = body.as_list()
    check_limits(texts, settings.max_texts, settings.max_text_chars)
    try:
        probs, model = await batcher.predict(texts)
    except NoModelLoaded as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded yet; retry shortly") from exc
    verdicts = [model.classifier.verdict(row) for row in probs]
    return ClassifyResponse(
        request_id=uuid.uuid4().hex,
        model_version=model.version,
        results=[Classification(**v.__dict__) for v in verdicts],
    )
