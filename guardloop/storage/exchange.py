"""Labeling elsewhere: the pool's items out to Label Studio or Argilla, their answers back in as reviewer answers.

Export writes one task / record per item (exchange_formats.py) with its live answers and the model's guess as a
pre-annotation. Import validates the whole file first and writes it in one transaction: a file with one bad
record imports nothing. An answer lands exactly as one given on the review page would (a live `review` label of
that reviewer, at the time the tool recorded); importing the same file twice changes nothing, and a reviewer
whose answer changed in the tool gets a correction (the old answer stays in the history).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from guardloop.storage.db import Database
from guardloop.storage.exchange_formats import ExchangeError, ImportedAnswer, export_record
from guardloop.storage.pool import PoolRepository
from guardloop.storage.review_records import LabelView
from guardloop.storage.tables import REVIEW, Label, PoolItem, utcnow
from guardloop.storage.texts import text_hash


@dataclass(frozen=True)
class ImportOutcome:
    items: int  # items the file answered
    new: int  # answers added
    corrected: int  # a reviewer's earlier answer replaced (kept in the history)
    unchanged: int  # already stored as the file has them


class _RolledBack(Exception):
    def __init__(self, outcome: ImportOutcome) -> None:
        self.outcome = outcome


class LabelExchange:
    def __init__(self, database: Database) -> None:
        self.database = database

    def export(self, fmt: str, *, requested_only: bool = False) -> Iterator[dict[str, Any]]:
        """Every pool item (or only those requested for review) with its live review answers, in `fmt`."""
        with self.database.read() as session:
            rows = session.scalars(
                select(Label).where(Label.active.is_(True), Label.kind == REVIEW).order_by(Label.id)
            ).all()
            answers: dict[int, list[LabelView]] = defaultdict(list)
            for row in rows:
                answers[row.item_id].append(LabelView.of(row))
        for item in PoolRepository(self.database).iter_items(requested_only=requested_only):
            yield export_record(fmt, item, answers.get(item.id, []))

    def import_answers(self, answers: Sequence[ImportedAnswer], *, dry_run: bool = False) -> ImportOutcome:
        """Store every answer, or none: ExchangeError names the first record that cannot be imported. `dry_run`:
        check and count everything, then roll back."""
        try:
            with self.database.write() as session:
                outcome = self._import(session, answers)
                if dry_run:
                    raise _RolledBack(outcome)
        except _RolledBack as rolled_back:
            return rolled_back.outcome
        return outcome

    def _import(self, session: Session, answers: Sequence[ImportedAnswer]) -> ImportOutcome:
        new = corrected = unchanged = 0
        items: set[int] = set()
        for answer in answers:
            item = self._item(session, answer)
            items.add(item.id)
            live = session.scalars(
                select(Label).where(
                    Label.item_id == item.id,
                    Label.reviewer == answer.reviewer,
                    Label.kind == REVIEW,
                    Label.active.is_(True),
                )
            ).first()
            if live is not None and live.label == answer.label:
                unchanged += 1
                continue
            row = Label(
                item_id=item.id,
                reviewer=answer.reviewer,
                label=answer.label,
                kind=REVIEW,
                created_at=answer.answered_at or utcnow(),
                active=True,
            )
            if live is not None:
                live.active = False
                session.flush()  # the live-answer index allows one per reviewer and item
            session.add(row)
            session.flush()
            if live is not None:
                live.superseded_by = row.id
                corrected += 1
            else:
                new += 1
        return ImportOutcome(items=len(items), new=new, corrected=corrected, unchanged=unchanged)

    @staticmethod
    def _item(session: Session, answer: ImportedAnswer) -> PoolItem:
        where = f"record {answer.record}"
        if answer.item_id is not None:
            item = session.get(PoolItem, answer.item_id)
            if item is None:
                raise ExchangeError(f"{where}: no pool item {answer.item_id} in this database")
            if text_hash(answer.text) != item.text_hash:
                raise ExchangeError(
                    f"{where}: its text is not pool item {answer.item_id}'s (a file exported from another database?)"
                )
        else:
            item = session.scalars(select(PoolItem).where(PoolItem.text_hash == text_hash(answer.text))).first()
            if item is None:
                raise ExchangeError(f"{where}: its text is not in the pool (import answers to exported items only)")
        if item.requested_at is None:
            raise ExchangeError(
                f"{where}: pool item {item.id} was never requested for review; export with --requested-only"
            )
        return item
