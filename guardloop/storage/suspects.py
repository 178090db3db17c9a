"""Suspected mislabels: settled labels the trainer's label check doubts.

The trainer marks them here before it trains (trainer/label_check.py finds them). A marked item leaves the
training set and goes back to the review queue for one other reviewer (review.py: the queue wants a second label
for it, and settle.py withholds it until that label is in); the second reviewer's answer then settles it and it
trains in the next cycle. Marking never touches the labels themselves: the first answer stays in the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, not_, select, update

from guardloop.storage.db import Database
from guardloop.storage.review import live_review_label
from guardloop.storage.tables import ADJUDICATION, Label, PoolItem


@dataclass(frozen=True)
class Suspicion:
    """Why one settled label is doubted: out-of-fold, the check's model gives the `given` label only `quality`
    (its predicted probability) and prefers `suggested`."""

    item_id: int
    given: str
    suggested: str
    quality: float


class SuspectRepository:
    def __init__(self, database: Database) -> None:
        self.database = database

    def mark(self, suspicions: Sequence[Suspicion], *, cycle_id: str | None, at: datetime) -> int:
        """Send the doubted labels' items back for a second reviewer, all or none; returns how many were marked
        (an item already marked, or no longer requested, is left as it is)."""
        marked = 0
        with self.database.write() as session:
            for suspicion in suspicions:
                result = session.execute(
                    update(PoolItem)
                    .where(
                        PoolItem.id == suspicion.item_id,
                        PoolItem.suspected_at.is_(None),
                        PoolItem.requested_at.is_not(None),
                    )
                    .values(
                        suspected_at=at,
                        suspicion={
                            "given": suspicion.given,
                            "suggested": suspicion.suggested,
                            "quality": round(float(suspicion.quality), 4),
                            "cycle_id": cycle_id,
                        },
                    )
                )
                marked += int(result.rowcount or 0)
        return marked

    @staticmethod
    def _short_of_second_look() -> Any:
        labels = (
            select(func.count())
            .where(Label.item_id == PoolItem.id, live_review_label())
            .correlate(PoolItem)
            .scalar_subquery()
        )
        adjudicated = exists().where(
            and_(Label.item_id == PoolItem.id, Label.active.is_(True), Label.kind == ADJUDICATION)
        )
        return and_(labels < 2, not_(adjudicated))

    def waiting(self) -> int:
        """Suspected items still waiting for their second reviewer (withheld from training until then)."""
        with self.database.read() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(PoolItem)
                    .where(PoolItem.suspected_at.is_not(None), self._short_of_second_look())
                )
                or 0
            )

    def waiting_items(self) -> list[tuple[int, str]]:
        """(id, text hash) of the suspected items still waiting for their second reviewer, oldest doubt first."""
        with self.database.read() as session:
            rows = session.execute(
                select(PoolItem.id, PoolItem.text_hash)
                .where(PoolItem.suspected_at.is_not(None), self._short_of_second_look())
                .order_by(PoolItem.suspected_at, PoolItem.id)
            ).all()
        return [(int(item_id), str(text_hash)) for item_id, text_hash in rows]

    def suspicion(self, item_id: int) -> dict | None:
        """The stored reason an item was doubted (None: it never was)."""
        with self.database.read() as session:
            return session.scalar(select(PoolItem.suspicion).where(PoolItem.id == item_id))
