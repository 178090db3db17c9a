"""What the review repository returns and raises: frozen views of labels, the settled labels the trainer reads,
the counts behind GET /review/stats, and the errors (each message says why and what to do instead)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from guardloop.core.labels import LABELS
from guardloop.storage.tables import NON_LABELS, Label

ANSWERS = (*LABELS, *NON_LABELS)
MAX_COMMENT_CHARS = 10_000  # the API sets a tighter limit; this one protects every other caller


class ReviewError(Exception):
    """A review action that cannot be done; the message says why and what to do instead."""


class ItemNotFound(ReviewError):
    pass


class NotRequested(ReviewError):
    pass


class AlreadyAnswered(ReviewError):
    pass


class ItemComplete(ReviewError):
    pass


class NothingToUndo(ReviewError):
    pass


class InvalidAnswer(ReviewError):
    pass


@dataclass(frozen=True)
class LabelView:
    id: int
    item_id: int
    reviewer: str
    label: str
    comment: str | None
    kind: str
    created_at: datetime
    active: bool
    superseded_by: int | None
    retracted_at: datetime | None

    @classmethod
    def of(cls, row: Label) -> LabelView:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "retracted_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass(frozen=True)
class FinalLabel:
    """An item whose label is settled: by one reviewer, by agreeing reviewers, or by adjudication."""

    item_id: int
    text: str
    label: str
    predicted: str
    reviewers: list[str]
    labeled_at: datetime
    adjudicated: bool
    request_reason: dict[str, Any] | None
    # More than one person looked at it (agreeing reviewers, a second opinion, a second look at a suspected label,
    # an adjudication): the label check leaves such labels alone.
    checked: bool = False


@dataclass
class ReviewStats:
    queue_length: int = 0  # items this reviewer can still answer
    requested: int = 0
    completed: int = 0
    awaiting_adjudication: int = 0
    my_labels: int = 0
    my_skips: int = 0
    by_reviewer: dict[str, int] = field(default_factory=dict)
    by_label: dict[str, int] = field(default_factory=dict)
