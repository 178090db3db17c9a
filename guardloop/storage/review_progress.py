"""A reviewer's progress for the review page: what they answered today and what the current cycle still needs.

Separate from the review repository (the queue and the labels) because it only counts; it runs after every
answer, so it is a handful of aggregates, never a scan of the labels in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, not_, select

from guardloop.storage.cycles import AWAITING_LABELS, Cycle
from guardloop.storage.review import ReviewRepository
from guardloop.storage.tables import ADJUDICATION, SKIP, Label, PoolItem


@dataclass(frozen=True)
class ReviewProgress:
    queue_length: int  # items this reviewer can still answer
    my_labels: int  # their live labels, all time (skips and "unsure" not counted)
    done_today: int  # their live answers since the start of their day (labels and "unsure"; skips are not done)
    cycle_id: str | None  # the newest cycle waiting for labels; None when no cycle waits
    cycle_requested: int  # items that cycle asked for
    cycle_left: int  # of those, the ones still short of the labels they need


def review_progress(reviews: ReviewRepository, reviewer: str, *, day_start: datetime) -> ReviewProgress:
    with reviews.database.read() as session:
        done_today = session.scalar(
            select(func.count()).where(
                Label.reviewer == reviewer,
                Label.active.is_(True),
                Label.label != SKIP,
                Label.created_at >= day_start,
            )
        )
        cycle_id = session.scalar(
            select(Cycle.id).where(Cycle.status == AWAITING_LABELS).order_by(Cycle.started_at.desc()).limit(1)
        )
        requested = left = 0
        if cycle_id is not None:
            of_cycle = [
                PoolItem.requested_at.is_not(None),
                PoolItem.request_reason["cycle_id"].as_string() == cycle_id,
            ]
            requested = session.scalar(select(func.count()).select_from(PoolItem).where(*of_cycle)) or 0
            no_adjudication = not_(
                exists().where(Label.item_id == PoolItem.id, Label.active.is_(True), Label.kind == ADJUDICATION)
            )
            # The repository's own "still needs a label" rule (labels per item, second opinions), so the page's
            # "left" and the queue can never disagree about what is done.
            left = (
                session.scalar(
                    select(func.count())
                    .select_from(PoolItem)
                    .where(*of_cycle, reviews._wants_labels(), no_adjudication)
                )
                or 0
            )
    return ReviewProgress(
        queue_length=reviews.queue_length(reviewer),
        my_labels=reviews.my_label_count(reviewer),
        done_today=int(done_today or 0),
        cycle_id=cycle_id,
        cycle_requested=int(requested),
        cycle_left=int(left),
    )
