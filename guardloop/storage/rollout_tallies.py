"""What the replicas saw a roll-out do, in the one database they share: tallies per replica, halts, and the
shadow's disagreements put in front of the reviewers.

Each replica owns one tally row per candidate and stage and overwrites it with its cumulative counts, so a retry
never counts twice and the sum over rows is the fleet's total. A halt is written once per candidate and stage by
whichever replica first finds the canary out of bounds; every replica reads it and stops routing to the canary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from guardloop.core.rollout_judgement import add_counts
from guardloop.storage.db import Database
from guardloop.storage.pool import PoolRecord, PoolRepository
from guardloop.storage.tables import Base, PoolItem, UTCDateTime, utcnow
from guardloop.storage.texts import redact, text_hash

SHADOW_REASON_KEY = "shadow"  # request_reason[SHADOW_REASON_KEY] names the candidate that disagreed


class RolloutTally(Base):
    __tablename__ = "rollout_tallies"

    candidate: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)  # RolloutState.key: shadow, canary@0.25
    replica: Mapped[str] = mapped_column(String(64), primary_key=True)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RolloutHalt(Base):
    __tablename__ = "rollout_halts"

    candidate: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    replica: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class HaltView:
    candidate: str
    stage: str
    reason: str
    replica: str
    at: datetime


@dataclass(frozen=True)
class Disagreement:
    """One text the serving model and the shadow labelled differently."""

    record: PoolRecord  # as the serving model saw it (what the pool stores)
    shadow_label: str


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class RolloutRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._insert = _insert(database.dialect)

    # ------------------------------------------------------------------ tallies
    def save_tally(self, candidate: str, stage: str, replica: str, counts: dict[str, Any]) -> None:
        """Replace this replica's cumulative counts for the candidate's stage."""
        statement = self._insert(RolloutTally).values(
            candidate=candidate, stage=stage, replica=replica, counts=counts, updated_at=utcnow()
        )
        statement = statement.on_conflict_do_update(
            index_elements=[RolloutTally.candidate, RolloutTally.stage, RolloutTally.replica],
            set_={"counts": statement.excluded.counts, "updated_at": statement.excluded.updated_at},
        )
        with self.database.write() as session:
            session.execute(statement)

    def totals(self, candidate: str, stage: str) -> dict[str, Any]:
        """The counts of every replica for the candidate's stage, summed."""
        with self.database.read() as session:
            rows = session.scalars(
                select(RolloutTally.counts).where(RolloutTally.candidate == candidate, RolloutTally.stage == stage)
            ).all()
        total: dict[str, Any] = {}
        for counts in rows:
            add_counts(total, counts)
        return total

    # ------------------------------------------------------------------ halts
    def halt(self, candidate: str, stage: str, reason: str, replica: str) -> HaltView:
        """Record that the candidate's stage must stop (the first reason wins); returns the halt in force."""
        statement = (
            self._insert(RolloutHalt)
            .values(candidate=candidate, stage=stage, reason=reason[:2000], replica=replica, at=utcnow())
            .on_conflict_do_nothing(index_elements=[RolloutHalt.candidate, RolloutHalt.stage])
        )
        with self.database.write() as session:
            session.execute(statement)
        found = self.halt_of(candidate)
        assert found is not None  # just written, or written first by another replica
        return found

    def halt_of(self, candidate: str) -> HaltView | None:
        """The first halt recorded for any stage of the candidate (a halted candidate stays halted)."""
        with self.database.read() as session:
            row = session.scalars(
                select(RolloutHalt).where(RolloutHalt.candidate == candidate).order_by(RolloutHalt.at).limit(1)
            ).first()
            return HaltView(row.candidate, row.stage, row.reason, row.replica, row.at) if row else None

    # ------------------------------------------------------------------ disagreements -> review queue
    def queue_disagreements(
        self,
        pool: PoolRepository,
        candidate: str,
        disagreements: Sequence[Disagreement],
        *,
        priority: float,
        at: datetime,
    ) -> int:
        """Store the texts in the pool and put them in the review queue ahead of the cycle's picks; an item that is
        already requested only has its priority raised. Returns how many items entered the queue."""
        if not disagreements:
            return 0
        pool.write_batch([d.record for d in disagreements])
        queued = 0
        with self.database.write() as session:
            for item in disagreements:
                text = item.record.text.replace("\x00", "\ufffd")  # the hash the pool stored it under
                key = text_hash(redact(text) if pool.redact_contacts else text)
                reason = {
                    SHADOW_REASON_KEY: candidate,
                    "serving_label": item.record.label,
                    "shadow_label": item.shadow_label,
                    "serving_version": item.record.model_version,
                }
                result = session.execute(
                    update(PoolItem)
                    .where(PoolItem.text_hash == key, PoolItem.requested_at.is_(None))
                    .values(requested_at=at, request_reason=reason, priority=priority)
                )
                if result.rowcount:
                    queued += 1
                else:
                    session.execute(
                        update(PoolItem)
                        .where(PoolItem.text_hash == key, PoolItem.priority < priority)
                        .values(priority=priority)
                    )
        return queued

    def reviewed_disagreements(self, candidate: str, final_labels: dict[int, str]) -> tuple[int, int]:
        """Of the candidate's disagreements that reviewers settled (`final_labels`: item id -> label), how many the
        candidate got right and how many the serving model did."""
        for_candidate = for_serving = 0
        with self.database.read() as session:
            rows = session.execute(
                select(PoolItem.id, PoolItem.request_reason).where(PoolItem.requested_at.is_not(None))
            ).all()
        for item_id, reason in rows:
            if not reason or reason.get(SHADOW_REASON_KEY) != candidate or item_id not in final_labels:
                continue
            label = final_labels[item_id]
            for_candidate += label == reason.get("shadow_label")
            for_serving += label == reason.get("serving_label")
        return for_candidate, for_serving
