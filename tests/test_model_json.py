"""The classifying routes write their answers with pydantic-core in one pass (service/model_json.py): the JSON
must be what FastAPI's own serialization of the route's response_model would have sent."""

from __future__ import annotations

import json

import pytest
from fastapi.encoders import jsonable_encoder
from guardloop.service.model_json import ModelJSONResponse
from guardloop.service.schemas import Classification, ClassifyResponse, ModerationResponse, ModerationResult

from guardloop.core.guidance import Guidance


def classify_answer() -> ClassifyResponse:
    guidance = Guidance(
        category="self-harm",
        topic=None,
        title="Suicidal thoughts",
        summary="Respond with warmth — “take it seriously”.",
        instructions=["Respond with empathy first."],
        avoid=[],
        resources=["988"],
        library_version="2026.1",
    )
    result = Classification(
        label="self-harm",
        scores={"self-harm": 0.9100000262260437, "not-harmful": 1e-07, "medical-advice": 0.0899999},
        confidence=0.9100000262260437,
        uncertainty=0.22,
        flagged=True,
        flagged_categories=["self-harm"],
        guidance=[guidance],
        decision="block",
        category_decisions={"self-harm": "block", "medical-advice": "allow"},
    )
    return ClassifyResponse(
        request_id="ab" * 16, model_version="v1", policy="default", policy_version="0", results=[result, result]
    )


def moderation_answer() -> ModerationResponse:
    result = ModerationResult(
        flagged=False,
        categories={"self-harm": False},
        category_scores={"self-harm": 0.25},
        decision="allow",
        category_decisions={"self-harm": "allow"},
    )
    return ModerationResponse(id="modr-1", model="v1", results=[result], policy_version="0")


@pytest.mark.parametrize("answer", [classify_answer(), moderation_answer()], ids=["classify", "moderations"])
def test_the_json_is_what_fastapi_would_have_sent(answer):
    response = ModelJSONResponse(answer)
    assert json.loads(response.body) == jsonable_encoder(answer)  # FastAPI's serialization of the same model
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.body)


def test_anything_but_a_model_is_refused():
    with pytest.raises(TypeError, match="pydantic model, not dict"):
        ModelJSONResponse({"label": "self-harm"})
