"""The one classification path behind every route that classifies (/classify, /v1/moderations).

Routes turn their own request shape into a list of texts and call `classify_texts`; limits, errors and
anything that must happen for every classified text (logging, metrics) live here, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from guardloop.models.onnx_model import Verdict
from guardloop.service.batcher import NoModelLoaded
from guardloop.service.model_holder import LoadedModel

from guardloop.core import telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifiedTexts:
    texts: list[str]
    verdicts: list[Verdict]  # in the order of `texts`
    model: LoadedModel  # the one version that answered all of them


def check_limits(texts: list[str], max_texts: int, max_chars: int) -> None:
    if not texts:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "no text to classify: send at least one text")
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


async def classify_texts(request: Request, texts: list[str], *, pooled: int | None = None) -> ClassifiedTexts:
    """Check the limits, classify `texts` through the micro-batcher, and return one verdict per text.

    The first `pooled` texts (default: all) are offered to the pool of uncertain traffic; pass fewer when
    the others are not user messages (a conversation's context window).
    """
    settings = request.app.state.settings
    check_limits(texts, settings.max_texts, settings.max_text_chars)
    try:
        probs, model = await request.app.state.batcher.predict(texts)
    except NoModelLoaded as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded yet; retry shortly") from exc
    classified = ClassifiedTexts(texts, [model.classifier.verdict(row) for row in probs], model)
    callers_texts = len(texts) if pooled is None else pooled
    telemetry.record_verdicts(classified.verdicts[:callers_texts])
    _offer_to_pool(request, classified, callers_texts)
    return classified


def _offer_to_pool(request: Request, classified: ClassifiedTexts, count: int) -> None:
    """Queue the results the pool wants; never waits and never fails the request."""
    pool = getattr(request.app.state, "pool", None)
    if pool is None or count <= 0:
        return
    try:
        pool.observe(
            classified.texts[:count],
            classified.verdicts[:count],
            classified.model.version,
            getattr(request.state, "client_id", None),
        )
    except Exception:
        log.exception("pool logging failed; the request is answered anyway")
