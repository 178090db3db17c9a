"""Records of active-learning cycles, and the LLM variations they accepted (reused by every later cycle)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, UniqueConstraint, select, update
from sqlalchemy.orm import Mapped, mapped_column

from guardloop.storage.db import Database
from guardloop.storage.tables import Base, BigId, UTCDateTime, utcnow
from guardloop.storage.texts import text_hash

# Cycle.status: the first three are in progress; the rest are final.
SELECTING = "selecting"
AWAITING_LABELS = "awaiting_labels"
TRAINING = "training"
PROMOTED = "promoted"
# Passed the gate and rolling out (shadow, then canary): promoted when its roll-out completes, rejected when it is
# aborted (trainer/rollout_step.py), so the record never says "promoted" for a model that serves no one.
SHADOWED = "shadowed"
REJECTED = "rejected"
FAILED = "failed"
SKIPPED = "skipped"
IN_PROGRESS = (SELECTING, AWAITING_LABELS, TRAINING)


class Cycle(Base):
    __tablename__ = "cycles"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    strategy: Mapped[str] = mapped_column(String(16))
    budget: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    label_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_version: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)


class Variation(Base):
    __tablename__ = "variations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("pool_items.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(32))
    cycle_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("item_id", "text_hash", name="uq_variations_item_text"),)


@dataclass(frozen=True)
class CycleView:
    id: str
    status: str
    strategy: str
    budget: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    label_deadline: datetime | None
    counts: dict[str, Any]
    steps: list[dict[str, Any]]
    metrics: dict[str, Any]
    parent_version: str | None
    model_version: str | None
    reason: str | None

    @classmethod
    def of(cls, row: Cycle) -> CycleView:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    def as_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("started_at", "updated_at", "finished_at", "label_deadline"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


class CycleRepository:
    def __init__(self, database: Database) -> None:
        self.database = database

    def create(self, cycle_id: str, *, strategy: str, budget: int, parent_version: str | None) -> CycleView:
        now = utcnow()
        row = Cycle(
            id=cycle_id,
            status=SELECTING,
            strategy=strategy,
            budget=budget,
            started_at=now,
            updated_at=now,
            counts={},
            steps=[],
            metrics={},
            parent_version=parent_version,
        )
        with self.database.write() as session:
            session.add(row)
            session.flush()
            return CycleView.of(row)

    def update(self, cycle_id: str, **fields: Any) -> None:
        fields["updated_at"] = utcnow()
        if fields.get("status") in (PROMOTED, SHADOWED, REJECTED, FAILED, SKIPPED):
            fields.setdefault("finished_at", fields["updated_at"])
        with self.database.write() as session:
            session.execute(update(Cycle).where(Cycle.id == cycle_id).values(**fields))

    def get(self, cycle_id: str) -> CycleView | None:
        with self.database.read() as session:
            row = session.get(Cycle, cycle_id)
            return CycleView.of(row) if row else None

    def in_progress(self) -> list[CycleView]:
        with self.database.read() as session:
            rows = session.scalars(select(Cycle).where(Cycle.status.in_(IN_PROGRESS)).order_by(Cycle.started_at))
            return [CycleView.of(row) for row in rows]

    def recent(self, limit: int = 20) -> list[CycleView]:
        with self.database.read() as session:
            rows = session.scalars(select(Cycle).order_by(Cycle.started_at.desc()).limit(limit))
            return [CycleView.of(row) for row in rows]

    def last_promoted(self) -> CycleView | None:
        with self.database.read() as session:
            row = session.scalars(
                select(Cycle).where(Cycle.status == PROMOTED).order_by(Cycle.finished_at.desc()).limit(1)
            ).first()
            return CycleView.of(row) if row else None

    def add_variations(self, item_id: int, label: str, texts: Iterable[str], cycle_id: str) -> int:
        """Store accepted variations of one labeled item; repeats of a stored variation are ignored."""
        with self.database.write() as session:
            known = set(session.scalars(select(Variation.text_hash).where(Variation.item_id == item_id)))
            added = 0
            for text in texts:
                digest = text_hash(text)
                if digest in known:
                    continue
                known.add(digest)
                session.add(
                    Variation(
                        item_id=item_id,
                        text=text,
                        text_hash=digest,
                        label=label,
                        cycle_id=cycle_id,
                        created_at=utcnow(),
                    )
                )
                added += 1
            return added

    def items_with_variations(self) -> set[int]:
        with self.database.read() as session:
            return set(session.scalars(select(Variation.item_id).distinct()))

    def variations(self, *, exclude_items: Sequence[int] = ()) -> list[tuple[str, str]]:
        """(text, label) of every stored variation, oldest first; the label is the one its item had then."""
        with self.database.read() as session:
            query = select(Variation.text, Variation.label, Variation.item_id).order_by(Variation.id)
            return [(text, label) for text, label, item in session.execute(query) if item not in exclude_items]
