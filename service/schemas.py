"""Request and response bodies of the HTTP API (and their OpenAPI examples)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guardloop.labels import LABELS


class ClassifyRequest(BaseModel):
    """Exactly one of `text` or `texts`. Length limits are the service's settings (see GET /models/current)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "I've lived everything I want to live"},
                {"texts": ["my code is killing me", "can my landlord keep my deposit?"]},
            ]
        },
    )

    text: str | None = Field(None, description="one message to classify")
    texts: list[str] | None = Field(None, description="several messages, answered in order")

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Classification(BaseModel):
    label: str = Field(description=f"one of {', '.join(LABELS)}")
    scores: dict[str, float] = Field(description="probability of every label; they sum to 1")
    confidence: float = Field(description="score of the predicted label")
    uncertainty: float = Field(description="normalized entropy of the scores: 0 certain, 1 uniform")
    flagged: bool = Field(description="label is not not-harmful and its score reaches that label's threshold")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "3b7f0c2e9a1d4c55b0e6f1a2d3c4b5a6",
                    "model_version": "v20261125-091500-1a2b",
                    "results": [
                        {
                            "label": "self-harm",
                            "scores": {
                                "self-harm": 0.91,
                                "medical-advice": 0.03,
                                "legal-advice": 0.01,
                                "financial-advice": 0.01,
                                "emergency-situation": 0.02,
                                "not-harmful": 0.02,
                            },
                            "confidence": 0.91,
                            "uncertainty": 0.22,
                            "flagged": True,
                        }
                    ],
                }
            ]
        }
    )

    request_id: str
    model_version: str
    results: list[Classification]


class ModelInfo(BaseModel):
    version: str
    created_at: str
    loaded_at: str
    load_seconds: float
    parent: str | None
    labels: list[str]
    thresholds: dict[str, float]
    quantization: str | None
    dev_macro_f1: float | None
    limits: dict[str, Any]


class ReloadResponse(BaseModel):
    serving: str | None
    swapped: bool
    reason: str = ""


class ErrorResponse(BaseModel):
    detail: str | list[Any]
