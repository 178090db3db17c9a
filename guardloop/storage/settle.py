"""How an item's live labels settle into the label the trainer learns from (ReviewRepository.final_labels)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from guardloop.storage.review_records import FinalLabel
from guardloop.storage.tables import ADJUDICATION, REVIEW, Label, PoolItem


def first_answers_of(session: Session) -> dict[tuple[int, str], int]:
    """(item, reviewer) -> id of the reviewer's first answer to the item, retired rows included: who answered
    first stays first through corrections, so a second opinion never takes over an item's label."""
    rows = session.execute(
        select(Label.item_id, Label.reviewer, func.min(Label.id))
        .where(Label.kind == REVIEW)
        .group_by(Label.item_id, Label.reviewer)
    ).all()
    return {(item_id, reviewer): first for item_id, reviewer, first in rows}


def settle(
    item: PoolItem, labels: Sequence[Label], first_answers: dict[tuple[int, str], int], labels_per_item: int
) -> FinalLabel | None:
    """The item's settled label from its live labels, or None while it is not settled: an adjudication decides;
    else `labels_per_item` agreeing reviewers (with one per item, the first reviewer, whatever a second opinion
    says); a label the label check doubted waits for a second reviewer, whose answer then decides."""
    adjudications = [label for label in labels if label.kind == ADJUDICATION]
    reviews = sorted(
        (label for label in labels if label.kind == REVIEW),
        key=lambda label: first_answers.get((item.id, label.reviewer), label.id),
    )  # in the order the reviewers first answered
    checked = bool(adjudications) or len(reviews) > 1
    if item.suspected_at is not None and not adjudications:
        # A doubted label: withheld until a second reviewer answers; then that answer settles the item.
        if len(reviews) < 2:
            return None
        second = reviews[1]
        return FinalLabel(
            item_id=item.id,
            text=item.text,
            label=second.label,
            predicted=item.label,
            reviewers=[reviews[0].reviewer, second.reviewer],
            labeled_at=second.created_at,
            adjudicated=False,
            request_reason=item.request_reason,
            checked=True,
        )
    if labels_per_item == 1 and len(reviews) > 1:  # a second opinion: the first reviewer's label decides
        reviews = reviews[:1]
    if adjudications:
        decided = adjudications[-1]
        return FinalLabel(
            item_id=item.id,
            text=item.text,
            label=decided.label,
            predicted=item.label,
            reviewers=[label.reviewer for label in reviews] + [decided.reviewer],
            labeled_at=decided.created_at,
            adjudicated=True,
            request_reason=item.request_reason,
            checked=True,
        )
    if len(reviews) < labels_per_item or len({label.label for label in reviews}) != 1:
        return None
    return FinalLabel(
        item_id=item.id,
        text=item.text,
        label=reviews[0].label,
        predicted=item.label,
        reviewers=[label.reviewer for label in reviews],
        labeled_at=max(label.created_at for label in reviews),
        adjudicated=False,
        request_reason=item.request_reason,
        checked=checked,
    )
