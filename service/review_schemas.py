"""Request and response bodies of the review API (/review/*) and the pool admin API (/admin/pool/*)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from guardloop.service.review_explain import Explanation, explain
from pydantic import BaseModel, ConfigDict, Field

from guardloop.core.canonical import canonical_text
from guardloop.core.labels import LABELS
from guardloop.storage import NON_LABELS, LabelView, StoredItem
from guardloop.storage.agreement import Agreement
from guardloop.storage.review_progress import ReviewProgress

# A hard bound whatever the settings say; the configured limit (review_max_comment_chars) is checked in the route.
COMMENT_HARD_LIMIT = 10_000


class LabelBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"label": "self-harm"}, {"label": "unsure", "comment": "sarcasm? cannot tell"}],
        },
    )

    label: str = Field(max_length=64, description=f"one of {', '.join(LABELS)}, or {' / '.join(NON_LABELS)}")
    comment: str | None = Field(None, max_length=COMMENT_HARD_LIMIT, description="optional note for the trainer")


class AdjudicationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(max_length=64, description=f"one of {', '.join(LABELS)}")
    comment: str | None = Field(None, max_length=COMMENT_HARD_LIMIT)


class ScoreOut(BaseModel):
    label: str
    score: float


class ExplanationOut(BaseModel):
    why: str = Field(description="why this item, in words; names no label the model leans to")
    model_guess: str = Field(description="the model's guess and its runner-up with their probabilities, in words")
    predicted: str = Field(description="the most likely label under `scores`")
    uncertainty: float = Field(description="normalized entropy of `scores`: 0 = sure, 1 = no idea")
    scores: list[ScoreOut] = Field(description="the probabilities the explanation uses, highest first")
    scored_when: Literal["picked", "classified"] = Field(
        description="picked: the model that picked the item for review; classified: logged at classification"
    )
    scored_by: str | None = Field(description="the model version behind `scores`, when known")

    @classmethod
    def of(cls, explanation: Explanation) -> ExplanationOut:
        return cls(
            why=explanation.why,
            model_guess=explanation.model_guess,
            predicted=explanation.predicted,
            uncertainty=explanation.uncertainty,
            scores=[ScoreOut(label=label, score=score) for label, score in explanation.scores],
            scored_when=explanation.scored_when,  # type: ignore[arg-type]
            scored_by=explanation.scored_by,
        )


class ReviewItem(BaseModel):
    id: int
    text: str = Field(description="the user's text as stored (redacted when pool_redact is on); render it as text")
    canonical_text: str | None = Field(
        None,
        description="what the model read (fullwidth, bidi overrides, invisible characters, look-alike letters and "
        "leetspeak undone); null when it is the text itself",
    )
    predicted_label: str = Field(description="the newest prediction logged for this text (see `explanation`)")
    scores: list[ScoreOut] = Field(description="all six as logged at classification time, highest first")
    uncertainty: float = Field(description="as logged at classification time (see `explanation.uncertainty`)")
    margin: float
    model_version: str
    seen_count: int
    reason: dict[str, Any] | None = Field(description="why the trainer picked it: strategy, cluster, uncertainty, ...")
    priority: float
    requested_at: str | None
    explanation: ExplanationOut = Field(description="why this item and what the model thought, from one set of scores")

    @classmethod
    def of(cls, item: StoredItem) -> ReviewItem:
        ranked = sorted(item.scores.items(), key=lambda kv: kv[1], reverse=True)
        return cls(
            id=item.id,
            text=item.text,
            canonical_text=_differs(canonical_text(item.text), item.text),
            predicted_label=item.label,
            scores=[ScoreOut(label=label, score=round(score, 4)) for label, score in ranked],
            uncertainty=round(item.uncertainty, 4),
            margin=round(item.margin, 4),
            model_version=item.model_version,
            seen_count=item.seen_count,
            reason=item.request_reason,
            priority=item.priority,
            requested_at=item.requested_at.isoformat() if item.requested_at else None,
            explanation=ExplanationOut.of(explain(item)),
        )


def _differs(canonical: str, text: str) -> str | None:
    return None if canonical == text else canonical


class LabelOut(BaseModel):
    id: int
    item_id: int
    reviewer: str
    label: str
    comment: str | None
    kind: str
    created_at: str
    active: bool
    superseded_by: int | None
    retracted_at: str | None

    @classmethod
    def of(cls, view: LabelView) -> LabelOut:
        return cls(**view.as_json())


class ProgressOut(BaseModel):
    queue_length: int = Field(description="items you can still answer")
    my_labels: int = Field(description="your live labels, all time (skips and unsure not counted)")
    done_today: int = Field(description="your live answers since day_start (labels and unsure; skips not counted)")
    cycle_id: str | None = Field(description="the newest cycle waiting for labels; null when none waits")
    cycle_requested: int = Field(description="items that cycle asked for")
    cycle_left: int = Field(description="of those, the ones still short of the labels they need")

    @classmethod
    def of(cls, progress: ReviewProgress) -> ProgressOut:
        return cls(**asdict(progress))


class QueueResponse(BaseModel):
    items: list[ReviewItem]
    queue_length: int = Field(description="items you can still answer")
    my_labels: int = Field(description="your live labels (skips not counted)")
    labels_per_item: int
    progress: ProgressOut


class UndoResponse(BaseModel):
    undone: LabelOut
    item: ReviewItem = Field(description="the item whose label was undone, to show it again")


class ItemHistory(BaseModel):
    item: ReviewItem
    labels: list[LabelOut] = Field(description="every answer ever given, oldest first, with corrections and undos")


class PairAgreementOut(BaseModel):
    reviewers: list[str] = Field(description="the two reviewers")
    items: int = Field(description="items both labelled")
    alpha: float | None = Field(description="Krippendorff's alpha (nominal); null when undefined")
    cohen_kappa: float | None = Field(description="Cohen's kappa; null when undefined")


class AgreementOut(BaseModel):
    """Reviewer agreement over items with two or more live labels; null where undefined (fewer than two such items,
    or a single label throughout)."""

    items: int = Field(description="items with two or more live labels (the ones measured)")
    labels: int = Field(description="live labels on those items")
    alpha: float | None = Field(description="Krippendorff's alpha (nominal) over all measured items")
    by_class: dict[str, float | None] = Field(description="one-vs-rest alpha per label")
    pairs: list[PairAgreementOut] = Field(description="per reviewer pair, on the items both labelled")

    @classmethod
    def of(cls, agreement: Agreement) -> AgreementOut:
        return cls.model_validate(agreement.as_json())


class ReviewStatsOut(BaseModel):
    reviewer: str
    queue_length: int
    my_labels: int
    my_skips: int
    requested: int
    completed: int
    awaiting_adjudication: int
    labels_per_item: int
    by_reviewer: dict[str, int]
    by_label: dict[str, int]
    second_opinion_share: float = Field(description="share of items also sent to a second reviewer (1 label/item)")
    agreement: AgreementOut


class AdjudicationItem(BaseModel):
    item: ReviewItem
    labels: list[LabelOut]


class WriterCountersOut(BaseModel):
    offered: int
    written: int
    duplicates: int
    dropped: int
    write_errors: int
    queued: int
    last_error: str | None
    last_write_at: str | None


class PoolStatusOut(BaseModel):
    enabled: bool
    writer: WriterCountersOut | None
    pool: dict[str, Any] | None = Field(description="row counts; null while the database is unavailable")
    database_error: str | None = None


class PurgeOut(BaseModel):
    purged: int
    older_than: str
