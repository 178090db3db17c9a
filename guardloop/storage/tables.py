"""The tables of the pool and the review queue (the migrations in migrations/versions create exactly these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Values of labels.label besides the six labels: the reviewer could not or would not decide.
SKIP = "skip"
UNSURE = "unsure"
NON_LABELS = (SKIP, UNSURE)

# labels.kind
REVIEW = "review"
ADJUDICATION = "adjudication"

# pool_items.sampled_by
UNCERTAIN = "uncertain"
RANDOM_SAMPLE = "random"
REVIEW_BAND = "review-band"  # in its tenant's review band: requested for review at once (service/decisions.py)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on both databases (SQLite would otherwise hand back naive times)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC time")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class PoolItem(Base):
    """One distinct (normalized) text seen by /classify; a repeat raises seen_count instead of adding a row."""

    __tablename__ = "pool_items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the normalized text
    seen_count: Mapped[int] = mapped_column(Integer, default=1)
    # The newest prediction seen for this text (a new model version overwrites it).
    label: Mapped[str] = mapped_column(String(32))
    scores: Mapped[dict[str, float]] = mapped_column(JSON)
    uncertainty: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)  # top score minus runner-up
    model_version: Mapped[str] = mapped_column(String(64))
    sampled_by: Mapped[str] = mapped_column(String(16))  # UNCERTAIN or RANDOM_SAMPLE
    client_id: Mapped[str | None] = mapped_column(String(64))
    # The tenant policy (from the policy file, not the caller) that decided on the text when it was pooled.
    tenant: Mapped[str | None] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # Set by the trainer when it wants a person to label the item; such items form the review queue.
    requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    request_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # strategy, cluster, uncertainty, cycle_id
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    # Set by the trainer's label check when it doubts the item's settled label: the label is withheld from
    # training and the item waits for a second reviewer, whose answer then settles it (settle.py).
    suspected_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    suspicion: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # given, suggested, quality, cycle_id

    __table_args__ = (Index("ix_pool_items_queue", "requested_at", "priority"),)


class Label(Base):
    """One answer of one reviewer for one item. Rows are never updated in place except to retire them:
    a correction adds a row and points the old one at it (superseded_by), an undo retracts it."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("pool_items.id", ondelete="CASCADE"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(32))  # one of LABELS, SKIP or UNSURE
    comment: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default=REVIEW)  # REVIEW or ADJUDICATION
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("labels.id", ondelete="SET NULL"))
    retracted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # A reviewer holds at most one live answer per item and kind, whatever races the API loses.
        Index(
            "uq_labels_live_answer",
            "item_id",
            "reviewer",
            "kind",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )


class Reviewer(Base):
    __tablename__ = "reviewers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token; the token is not kept
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
