"""Request and response bodies of the HTTP API (and their OpenAPI examples)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from guardloop.core.guidance import Guidance
from guardloop.core.labels import LABELS

# A tenant policy's decision on a text or a category (service/decisions.py).
Decision = Literal["allow", "review", "block"]


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content is empty: send the words of this turn (or leave the turn out)")
        return value


class ClassifyRequest(BaseModel):
    """Exactly one of `text`, `texts` or `messages`. Limits are the service's settings (GET /models/current).

    `messages` is a conversation: the verdict is for its last user turn, read with up to
    `conversation_context_turns` earlier user turns as context (see the README).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "I've lived everything I want to live"},
                {"texts": ["my code is killing me", "can my landlord keep my deposit?"]},
                {
                    "messages": [
                        {"role": "user", "content": "I don't see the point of anything anymore"},
                        {"role": "assistant", "content": "I'm sorry you're feeling this way. Want to talk?"},
                        {"role": "user", "content": "how many of my pills would be too many"},
                    ]
                },
            ]
        },
    )

    text: str | None = Field(None, description="one message to classify")
    texts: list[str] | None = Field(None, description="several messages, answered in order")
    messages: list[Message] | None = Field(
        None, description="a conversation, oldest turn first; one verdict, for the last user turn"
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        given = [value for value in (self.text, self.texts, self.messages) if value is not None]
        if len(given) != 1:
            raise ValueError(
                "send exactly one of 'text' (a string), 'texts' (a list of strings) "
                "or 'messages' (a conversation: [{'role': 'user', 'content': ...}, ...])"
            )
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Classification(BaseModel):
    label: str = Field(description=f"one of {', '.join(LABELS)}")
    scores: dict[str, float] = Field(description="probability of every label; they sum to 1")
    confidence: float = Field(description="score of the predicted label")
    uncertainty: float = Field(description="normalized entropy of the scores: 0 certain, 1 uniform")
    flagged: bool = Field(description="some harmful category's score reaches that category's threshold")
    flagged_categories: list[str] = Field(
        default_factory=list, description="the harmful categories whose score reaches their threshold, highest first"
    )
    guidance: list[Guidance] = Field(
        default_factory=list,
        description="what the chatbot should do: one entry per category decided block or review, most severe first",
    )
    decision: Decision = Field(
        "allow",
        description="the caller's tenant policy: block when a category reaches its threshold (= flagged), review when "
        "a score is in its category's review band, else allow",
    )
    category_decisions: dict[str, Decision] = Field(
        default_factory=dict, description="every harmful category's decision (an ignored category: always allow)"
    )
    decided_by_context: bool | None = Field(
        None,
        description="conversation input only: true when the verdict came from the last user turn read with its "
        "context, false when from the last user turn alone",
    )


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
                            "flagged_categories": ["self-harm"],
                            "guidance": [
                                {
                                    "category": "self-harm",
                                    "topic": "suicidal-thoughts",
                                    "title": "Suicidal thoughts",
                                    "summary": "The person may be thinking about hurting themselves; respond with "
                                    "warmth, take it seriously, and connect them with people who can help.",
                                    "instructions": [
                                        "Respond with empathy first: acknowledge their pain without judgement.",
                                        "Offer crisis resources they can reach now (call, text or chat).",
                                    ],
                                    "avoid": ["Never describe, compare or rank methods, means, doses or lethality."],
                                    "resources": ["988 Suicide & Crisis Lifeline (US): call or text 988"],
                                    "library_version": "2026.1",
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )

    request_id: str
    model_version: str
    policy: str = Field("default", description="the tenant policy that decided (from the policy file)")
    policy_version: str = Field("builtin", description="its file's version ('builtin': no policy file)")
    results: list[Classification]


class RolloutInfo(BaseModel):
    """The roll-out in the registry (models/rollout.py), as this replica follows it."""

    candidate: str
    stage: Literal["shadow", "canary"]
    share: float  # of live traffic the canary answers (0 in shadow)
    by: Literal["client", "request"]
    since: str
    loaded: bool  # this replica has the candidate loaded beside the served model and uses it
    halted: str | None  # why the canary was stopped (out of its bounds), or None


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
    rollout: RolloutInfo | None = None


class ReloadResponse(BaseModel):
    serving: str | None
    swapped: bool
    reason: str = ""


class ErrorResponse(BaseModel):
    detail: str | list[Any]


class ModerationRequest(BaseModel):
    """OpenAI's moderation request: `input` is a string, a list of strings, or a list of text parts."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": "I've lived everything I want to live"},
                {"input": ["my code is killing me", "can my landlord keep my deposit?"], "model": "guardloop"},
            ]
        },
    )

    input: str | list[str] = Field(
        description="text(s) to classify; OpenAI's text parts {'type': 'text', 'text': ...} are accepted too"
    )
    model: str | None = Field(None, description="reported back as is; the served model answers whatever it says")

    @field_validator("input", mode="before")
    @classmethod
    def _text_parts_to_strings(cls, value: Any) -> Any:
        # OpenAI's multi-modal form: [{"type": "text", "text": ...}, {"type": "image_url", ...}]. Text parts
        # become strings; anything else gets a message that says what to send instead.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("input must be a string or a list of strings")
        texts = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict):
                if item.get("type") == "image_url":
                    raise ValueError(f"input.{i} is an image; guardloop classifies text only, send its text")
                if item.get("type") != "text" or not isinstance(item.get("text"), str) or set(item) != {"type", "text"}:
                    raise ValueError(f"input.{i} must be a string or a text part {{'type': 'text', 'text': '...'}}")
                texts.append(item["text"])
            else:
                raise ValueError(f"input.{i} must be a string or a text part {{'type': 'text', 'text': '...'}}")
        return texts

    def as_list(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ModerationResult(BaseModel):
    flagged: bool = Field(description="some category reaches its threshold")
    categories: dict[str, bool] = Field(description="every label: does it reach its threshold (not-harmful: never)")
    category_scores: dict[str, float] = Field(description="probability of every label; they sum to 1")
    # guardloop's own fields: OpenAI's client keeps unknown fields without validating them.
    decision: Decision = Field("allow", description="the tenant policy's decision; `flagged` is decision == block")
    category_decisions: dict[str, Decision] = Field(
        default_factory=dict, description="every harmful category's decision: allow, review or block"
    )


class ModerationResponse(BaseModel):
    """OpenAI's moderation response, over guardloop's six labels."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "modr-3b7f0c2e9a1d4c55b0e6f1a2d3c4b5a6",
                    "model": "v20261125-091500-1a2b",
                    "results": [
                        {
                            "flagged": True,
                            "categories": {
                                "self-harm": True,
                                "medical-advice": False,
                                "legal-advice": False,
                                "financial-advice": False,
                                "emergency-situation": False,
                                "not-harmful": False,
                            },
                            "category_scores": {
                                "self-harm": 0.91,
                                "medical-advice": 0.03,
                                "legal-advice": 0.01,
                                "financial-advice": 0.01,
                                "emergency-situation": 0.02,
                                "not-harmful": 0.02,
                            },
                        }
                    ],
                }
            ]
        }
    )

    id: str = Field(description="'modr-' and a random hex string")
    model: str = Field(description="the request's `model` if given, else the served model version")
    results: list[ModerationResult]
    policy_version: str = Field("builtin", description="version of the policy file that decided (guardloop's field)")


class RefusedGuidelines(BaseModel):
    source: str
    reason: str
    at: str


class GuidelinesResponse(BaseModel):
    version: str = Field(description="the library's version")
    source: str = Field(description="'builtin' or the operator's file it was loaded from")
    loaded_at: str
    refused: RefusedGuidelines | None = Field(
        description="the last operator file that was refused (still serving the library above), if any"
    )
    description: str
    categories: dict[str, Any] = Field(description="the library itself: one entry per harmful category")
