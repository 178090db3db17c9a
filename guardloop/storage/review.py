"""The reviewers' side: the queue of requested items in priority order, labels with their history
(corrections and undos retire rows, never rewrite them), adjudication of disagreements, and the final
labels the trainer reads."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, not_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from guardloop.core.labels import LABELS
from guardloop.storage.db import Database
from guardloop.storage.pool import StoredItem, _as_time
from guardloop.storage.review_records import (
    ANSWERS,
    MAX_COMMENT_CHARS,
    AlreadyAnswered,
    FinalLabel,
    InvalidAnswer,
    ItemComplete,
    ItemNotFound,
    LabelView,
    NothingToUndo,
    NotRequested,
    ReviewStats,
)
from guardloop.storage.settle import first_answers_of, settle
from guardloop.storage.tables import ADJUDICATION, NON_LABELS, REVIEW, Label, PoolItem, utcnow

# Second opinions: an item is picked when (id * _SPREAD) % _BUCKETS falls below share * _BUCKETS. The constant is
# Knuth's multiplicative hash; being coprime to _BUCKETS it permutes ids over the buckets, so any run of _BUCKETS
# consecutive ids holds exactly the share, and SQL can evaluate the same rule in the queue's WHERE clause.
_SPREAD = 2_654_435_761
_BUCKETS = 10_000


def _live(kind: str) -> Any:
    return and_(Label.item_id == PoolItem.id, Label.active.is_(True), Label.kind == kind)


def live_review_label() -> Any:
    """A label that counts as a reviewer's answer: live (not retracted or superseded), a review (not an
    adjudication), and one of the six labels (not a skip or "unsure")."""
    return and_(Label.active.is_(True), Label.kind == REVIEW, Label.label.in_(LABELS))


def _real_label_count() -> Any:
    return (
        select(func.count())
        .where(Label.item_id == PoolItem.id, live_review_label())
        .correlate(PoolItem)
        .scalar_subquery()
    )


def second_opinion_wanted(item_id: int, share: float) -> bool:
    """Whether an item (with one label required) also goes to a second reviewer: deterministic per id."""
    return item_id * _SPREAD % _BUCKETS < round(share * _BUCKETS)


class ReviewRepository:
    def __init__(self, database: Database, *, labels_per_item: int = 1, second_opinion_share: float = 0.0) -> None:
        """`second_opinion_share` (only with one label per item): that share of items stays in the queue for one
        other reviewer after its first label, so reviewer agreement can always be measured; the first label still
        settles the item (see settle.py), the second one only measures."""
        if labels_per_item < 1:
            raise ValueError("labels_per_item must be at least 1")
        if not 0.0 <= second_opinion_share <= 1.0:
            raise ValueError("second_opinion_share must be between 0 and 1")
        self.database = database
        self.labels_per_item = labels_per_item
        self.second_opinion_share = second_opinion_share if labels_per_item == 1 else 0.0

    # ------------------------------------------------------------------ the queue
    def _wants_labels(self) -> Any:
        """The SQL condition "this item still needs a label": short of labels_per_item, or a second-opinion item
        short of two."""
        short = _real_label_count() < self.labels_per_item
        # A label the trainer's label check doubts waits for a second reviewer (see suspects.py).
        suspected = and_(_real_label_count() < 2, PoolItem.suspected_at.is_not(None))
        threshold = round(self.second_opinion_share * _BUCKETS)
        if threshold == 0:
            return or_(short, suspected)
        return or_(short, suspected, and_(_real_label_count() < 2, (PoolItem.id * _SPREAD) % _BUCKETS < threshold))

    def _labels_wanted(self, item: PoolItem) -> int:
        if item.suspected_at is not None or second_opinion_wanted(item.id, self.second_opinion_share):
            return max(2, self.labels_per_item)
        return self.labels_per_item

    def _open_for(self, reviewer: str) -> list[Any]:
        return [
            PoolItem.requested_at.is_not(None),
            self._wants_labels(),
            not_(exists().where(_live(REVIEW), Label.reviewer == reviewer)),
            not_(exists().where(_live(ADJUDICATION))),
        ]

    def queue(self, reviewer: str, *, limit: int = 1) -> list[StoredItem]:
        """The next items for `reviewer`: requested, still open, not yet answered by them; highest priority first."""
        with self.database.read() as session:
            rows = session.scalars(
                select(PoolItem)
                .where(*self._open_for(reviewer))
                # Suspected labels first: their items are withheld from training until a second reviewer answers.
                .order_by(PoolItem.suspected_at.is_(None), PoolItem.priority.desc(), PoolItem.requested_at, PoolItem.id)
                .limit(limit)
            ).all()
            return [StoredItem.of(row) for row in rows]

    def queue_length(self, reviewer: str) -> int:
        with self.database.read() as session:
            return session.scalar(select(func.count()).select_from(PoolItem).where(*self._open_for(reviewer))) or 0

    def waiting(self) -> tuple[int, datetime | None]:
        """Items waiting for any reviewer (requested, short of labels_per_item labels, not adjudicated), and
        when the oldest of them was requested (None for an empty queue). Two aggregates: cheap enough to poll."""
        with self.database.read() as session:
            count, oldest = session.execute(
                select(func.count(), func.min(PoolItem.requested_at)).where(
                    PoolItem.requested_at.is_not(None),
                    self._wants_labels(),
                    not_(exists().where(_live(ADJUDICATION))),
                )
            ).one()
        return int(count), _as_time(oldest)

    # ------------------------------------------------------------------ answering
    def add_label(self, item_id: int, reviewer: str, label: str, comment: str | None = None) -> LabelView:
        """Record `reviewer`'s answer (one of the six labels, skip or unsure) for a requested item."""
        _check_answer(label, comment)
        try:
            with self.database.write() as session:
                item = self._locked_item(session, item_id)
                if item.requested_at is None:
                    raise NotRequested(f"item {item_id} was not requested for review; take items from the queue")
                if self._live_answer(session, item_id, reviewer, REVIEW) is not None:
                    raise AlreadyAnswered(
                        f"you already answered item {item_id}; to change your answer use PUT "
                        f"/review/items/{item_id}/label (the old one stays in the history)"
                    )
                if self._adjudicated(session, item_id):
                    raise ItemComplete(f"item {item_id} is already adjudicated")
                wanted = self._labels_wanted(item)
                if label in LABELS and self._real_count(session, item_id) >= wanted:
                    raise ItemComplete(f"item {item_id} already has the {wanted} label(s) it needs")
                return LabelView.of(_add_label(session, item_id, reviewer, label, comment, REVIEW))
        except IntegrityError:  # a concurrent request of the same reviewer won the race
            raise AlreadyAnswered(f"you already answered item {item_id}") from None

    def correct_label(self, item_id: int, reviewer: str, label: str, comment: str | None = None) -> LabelView:
        """Replace `reviewer`'s live answer for the item; the old row stays, pointing at the new one."""
        _check_answer(label, comment)
        with self.database.write() as session:
            item = self._locked_item(session, item_id)
            old = self._live_answer(session, item_id, reviewer, REVIEW)
            if old is None:
                raise NothingToUndo(
                    f"you have no answer for item {item_id} to correct; answer it first (POST .../label)"
                )
            wanted = self._labels_wanted(item)
            if label in LABELS and old.label not in LABELS and self._real_count(session, item_id) >= wanted:
                raise ItemComplete(f"item {item_id} already has the {wanted} label(s) it needs")
            return LabelView.of(self._replace(session, old, label, comment, REVIEW))

    def undo_last(self, reviewer: str) -> LabelView:
        """Retract `reviewer`'s most recent live answer (a correction undone brings back the answer it replaced)."""
        with self.database.write() as session:
            last = session.scalars(
                select(Label)
                .where(Label.reviewer == reviewer, Label.active.is_(True))
                .order_by(Label.created_at.desc(), Label.id.desc())
                .limit(1)
            ).first()
            if last is None:
                raise NothingToUndo("nothing to undo: you have no live answers")
            self._locked_item(session, last.item_id)
            last.active = False
            last.retracted_at = utcnow()
            session.flush()  # the live-answer index must see the old row retired before the previous one returns
            previous = session.scalars(select(Label).where(Label.superseded_by == last.id)).first()
            if previous is not None:
                previous.active = True
                previous.superseded_by = None
            session.flush()
            return LabelView.of(last)

    def history(self, item_id: int, *, reader: str | None = None) -> list[LabelView]:
        """Every answer the item ever got. With `reader` (a reviewer's name) the item must be one they may read
        (see readable_by); any other item is "not found", exactly like a missing one, so ids cannot be probed."""
        with self.database.read() as session:
            if session.get(PoolItem, item_id) is None or (
                reader is not None and not self._readable(session, item_id, reader)
            ):
                raise ItemNotFound(f"no pool item {item_id}")
            rows = session.scalars(select(Label).where(Label.item_id == item_id).order_by(Label.id)).all()
            return [LabelView.of(row) for row in rows]

    def readable_by(self, item_id: int, reviewer: str) -> bool:
        """Whether `reviewer` may read the item's text: it is requested for review (the trainer put it in front of
        the team: the queue, adjudication) or they answered it at some point (also after a withdrawal or undo).
        Never-requested pool texts are raw traffic; only admins read those."""
        with self.database.read() as session:
            return self._readable(session, item_id, reviewer)

    def _readable(self, session: Session, item_id: int, reviewer: str) -> bool:
        answered = exists().where(Label.item_id == PoolItem.id, Label.reviewer == reviewer)
        found = session.scalar(
            select(PoolItem.id).where(PoolItem.id == item_id, or_(PoolItem.requested_at.is_not(None), answered))
        )
        return found is not None

    # ------------------------------------------------------------------ adjudication
    def adjudication_queue(self, *, limit: int = 50) -> list[tuple[StoredItem, list[LabelView]]]:
        """Items whose reviewers disagree (labels_per_item >= 2) and nobody adjudicated yet. With one label per item
        the first label settles the item; a second opinion that differs is measured (agreement), not adjudicated."""
        if self.labels_per_item == 1:
            return []
        distinct_labels = (
            select(func.count(func.distinct(Label.label)))
            .where(Label.item_id == PoolItem.id, live_review_label())
            .correlate(PoolItem)
            .scalar_subquery()
        )
        with self.database.read() as session:
            items = session.scalars(
                select(PoolItem)
                .where(
                    PoolItem.requested_at.is_not(None),
                    _real_label_count() >= self.labels_per_item,
                    distinct_labels > 1,
                    not_(exists().where(_live(ADJUDICATION))),
                )
                .order_by(PoolItem.priority.desc(), PoolItem.id)
                .limit(limit)
            ).all()
            result = []
            for item in items:
                labels = session.scalars(
                    select(Label)
                    .where(Label.item_id == item.id, Label.active.is_(True), Label.kind == REVIEW)
                    .order_by(Label.id)
                ).all()
                result.append((StoredItem.of(item), [LabelView.of(label) for label in labels]))
            return result

    def adjudicate(self, item_id: int, reviewer: str, label: str, comment: str | None = None) -> LabelView:
        if label not in LABELS:
            raise InvalidAnswer(f"an adjudication must be one of the six labels: {', '.join(LABELS)}")
        _check_answer(label, comment)
        with self.database.write() as session:
            self._locked_item(session, item_id)
            old = self._live_answer(session, item_id, None, ADJUDICATION)
            if old is not None:
                return LabelView.of(self._replace(session, old, label, comment, ADJUDICATION, reviewer=reviewer))
            if not self._disputed(session, item_id):
                raise ItemComplete(f"item {item_id} is not awaiting adjudication (its reviewers do not disagree)")
            return LabelView.of(_add_label(session, item_id, reviewer, label, comment, ADJUDICATION))

    def _disputed(self, session: Session, item_id: int) -> bool:
        labels = session.scalars(select(Label.label).where(Label.item_id == item_id, live_review_label())).all()
        return self.labels_per_item > 1 and len(labels) >= self.labels_per_item and len(set(labels)) > 1

    # ------------------------------------------------------------------ results
    def final_labels(self, *, since: datetime | None = None, cycle_id: str | None = None) -> list[FinalLabel]:
        """Settled labels of requested items (what the trainer learns from), oldest first."""
        with self.database.read() as session:
            rows = session.execute(
                select(Label, PoolItem)
                .join(PoolItem, Label.item_id == PoolItem.id)
                .where(Label.active.is_(True), Label.label.in_(LABELS), PoolItem.requested_at.is_not(None))
                .order_by(Label.item_id, Label.id)
            ).all()
            first_answers = first_answers_of(session)
        by_item: dict[int, tuple[PoolItem, list[Label]]] = {}
        for label, item in rows:
            by_item.setdefault(item.id, (item, []))[1].append(label)
        finals = []
        for item, labels in by_item.values():
            final = settle(item, labels, first_answers, self.labels_per_item)
            if final is None:
                continue
            if since is not None and final.labeled_at <= since:
                continue
            if cycle_id is not None and (item.request_reason or {}).get("cycle_id") != cycle_id:
                continue
            finals.append(final)
        return sorted(finals, key=lambda f: (f.labeled_at, f.item_id))

    def my_label_count(self, reviewer: str) -> int:
        """`reviewer`'s live labels (skips and unsure not counted): cheap, for every page refresh."""
        with self.database.read() as session:
            return session.scalar(select(func.count()).where(Label.reviewer == reviewer, live_review_label())) or 0

    def stats(self, reviewer: str | None = None) -> ReviewStats:
        stats = ReviewStats()
        finals = self.final_labels()
        stats.completed = len(finals)
        stats.by_label = dict(Counter(final.label for final in finals))
        stats.awaiting_adjudication = len(self.adjudication_queue(limit=1_000_000)) if self.labels_per_item > 1 else 0
        with self.database.read() as session:
            stats.requested = (
                session.scalar(select(func.count()).select_from(PoolItem).where(PoolItem.requested_at.is_not(None)))
                or 0
            )
            stats.by_reviewer = dict(
                session.execute(
                    select(Label.reviewer, func.count()).where(live_review_label()).group_by(Label.reviewer)
                ).all()
            )
            if reviewer is not None:
                stats.my_labels = stats.by_reviewer.get(reviewer, 0)
                stats.my_skips = (
                    session.scalar(
                        select(func.count()).where(
                            Label.reviewer == reviewer,
                            Label.active.is_(True),
                            Label.kind == REVIEW,
                            Label.label.in_(NON_LABELS),
                        )
                    )
                    or 0
                )
        if reviewer is not None:
            stats.queue_length = self.queue_length(reviewer)
        return stats

    # ------------------------------------------------------------------ helpers
    def _locked_item(self, session: Session, item_id: int) -> PoolItem:
        # Row lock on PostgreSQL (SQLite's write transaction already holds the database lock).
        item = session.scalars(select(PoolItem).where(PoolItem.id == item_id).with_for_update()).first()
        if item is None:
            raise ItemNotFound(f"no pool item {item_id}")
        return item

    def _live_answer(self, session: Session, item_id: int, reviewer: str | None, kind: str) -> Label | None:
        conditions = [Label.item_id == item_id, Label.active.is_(True), Label.kind == kind]
        if reviewer is not None:
            conditions.append(Label.reviewer == reviewer)
        return session.scalars(select(Label).where(*conditions)).first()

    def _real_count(self, session: Session, item_id: int) -> int:
        return session.scalar(select(func.count()).where(Label.item_id == item_id, live_review_label())) or 0

    def _adjudicated(self, session: Session, item_id: int) -> bool:
        return self._live_answer(session, item_id, None, ADJUDICATION) is not None

    def _replace(
        self, session: Session, old: Label, label: str, comment: str | None, kind: str, *, reviewer: str | None = None
    ) -> Label:
        old.active = False
        session.flush()  # retire the old row first: the live-answer index allows one per reviewer and item
        new = Label(
            item_id=old.item_id,
            reviewer=reviewer or old.reviewer,
            label=label,
            comment=comment,
            kind=kind,
            created_at=utcnow(),
            active=True,
        )
        session.add(new)
        session.flush()
        old.superseded_by = new.id
        session.flush()
        return new


def _add_label(session: Session, item_id: int, reviewer: str, label: str, comment: str | None, kind: str) -> Label:
    row = Label(
        item_id=item_id, reviewer=reviewer, label=label, comment=comment, kind=kind, created_at=utcnow(), active=True
    )
    session.add(row)
    session.flush()
    return row


def _check_answer(label: str, comment: str | None) -> None:
    if label not in ANSWERS:
        raise InvalidAnswer(f"unknown answer {label!r}; use one of {', '.join(ANSWERS)}")
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise InvalidAnswer(f"comment has {len(comment)} characters, at most {MAX_COMMENT_CHARS}")
