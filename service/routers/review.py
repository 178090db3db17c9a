"""The review API: the queue of requested items, labels (with corrections, undo and history), stats,
adjudication. Every route needs a reviewer token. Handlers are plain functions: FastAPI runs them in worker
threads, so database calls never block the event loop (and /classify)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status
from guardloop.service.auth import ReviewerName, ReviewReader
from guardloop.service.deps import DatabaseDep, SettingsDep
from guardloop.service.review_schemas import (
    AdjudicationBody,
    AdjudicationItem,
    AgreementOut,
    ItemHistory,
    LabelBody,
    LabelOut,
    ProgressOut,
    QueueResponse,
    ReviewItem,
    ReviewStatsOut,
    UndoResponse,
)
from guardloop.service.schemas import ErrorResponse

from guardloop.core import telemetry
from guardloop.core.labels import LABELS, UnknownLabelError, parse_label
from guardloop.storage import (
    NON_LABELS,
    AlreadyAnswered,
    DatabaseUnavailable,
    InvalidAnswer,
    ItemComplete,
    ItemNotFound,
    NothingToUndo,
    NotRequested,
    PoolRepository,
    ReviewError,
    ReviewRepository,
)
from guardloop.storage.agreement import read_agreement
from guardloop.storage.review_progress import review_progress

router = APIRouter(
    prefix="/review",
    tags=["review"],
    responses={
        401: {"model": ErrorResponse, "description": "no reviewer token"},
        403: {"model": ErrorResponse, "description": "unknown or revoked reviewer token"},
        503: {"model": ErrorResponse, "description": "database unavailable"},
    },
)

# Pool item ids are 64-bit database integers: a larger number is a 422 here, not an overflow in the database driver
# (a 500 that schemathesis found).
ItemId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a pool item's id")]

_STATUS_OF = {
    ItemNotFound: status.HTTP_404_NOT_FOUND,
    NotRequested: status.HTTP_409_CONFLICT,
    AlreadyAnswered: status.HTTP_409_CONFLICT,
    ItemComplete: status.HTTP_409_CONFLICT,
    NothingToUndo: status.HTTP_409_CONFLICT,
    InvalidAnswer: status.HTTP_422_UNPROCESSABLE_CONTENT,
}


@contextmanager
def review_errors() -> Iterator[None]:
    try:
        yield
    except ReviewError as exc:
        raise HTTPException(_STATUS_OF.get(type(exc), status.HTTP_409_CONFLICT), str(exc)) from None
    except DatabaseUnavailable:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable; retry shortly") from None


def parse_answer(raw: str, *, allow_non_labels: bool = True) -> str:
    """One of the six labels (aliases and case ignored), or skip/unsure where allowed."""
    key = raw.strip().lower()
    if allow_non_labels and key in NON_LABELS:
        return key
    try:
        return parse_label(raw)
    except UnknownLabelError:
        accepted = [*LABELS, *NON_LABELS] if allow_non_labels else list(LABELS)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown label {raw[:64]!r}; use one of {', '.join(accepted)}"
        ) from None


def checked_comment(comment: str | None, limit: int) -> str | None:
    if comment is None or not comment.strip():
        return None
    if len(comment) > limit:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"comment has {len(comment)} characters, at most {limit} allowed; shorten it",
        )
    return comment.strip()


def _reviews(database: DatabaseDep, settings: SettingsDep) -> ReviewRepository:
    return ReviewRepository(
        database,
        labels_per_item=settings.review_labels_per_item,
        second_opinion_share=settings.review_second_opinion_share,
    )


def _item(database: DatabaseDep, item_id: int) -> ReviewItem:
    item = PoolRepository(database).get(item_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no pool item {item_id}")
    return ReviewItem.of(item)


DayStart = Annotated[
    datetime | None,
    Query(
        description="when your day began, with its UTC offset (e.g. 2026-05-04T00:00:00+02:00), for done_today; "
        "default: midnight UTC"
    ),
]


def checked_day_start(day_start: datetime | None) -> datetime:
    now = datetime.now(UTC)
    if day_start is None:
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if day_start.tzinfo is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "day_start needs a UTC offset, e.g. 2026-05-04T00:00:00+02:00"
        )
    if not now - timedelta(hours=48) <= day_start <= now + timedelta(hours=14):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "day_start must be the start of your current day (local midnight)"
        )
    return day_start


@router.get("/queue", response_model=QueueResponse, summary="The next items for you, highest priority first")
def queue(
    reviewer: ReviewerName,
    database: DatabaseDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100, description="how many items")] = 1,
    day_start: DayStart = None,
) -> QueueResponse:
    since = checked_day_start(day_start)
    reviews = _reviews(database, settings)
    with review_errors():  # counts only: this runs after every answer, the full stats are GET /review/stats
        items = reviews.queue(reviewer, limit=limit)
        progress = review_progress(reviews, reviewer, day_start=since)
    return QueueResponse(
        items=[ReviewItem.of(item) for item in items],
        queue_length=progress.queue_length,
        my_labels=progress.my_labels,
        labels_per_item=settings.review_labels_per_item,
        progress=ProgressOut.of(progress),
    )


@router.get(
    "/progress",
    response_model=ProgressOut,
    summary="Your progress: answered today, your queue, and what the current cycle still needs",
)
def progress(
    reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep, day_start: DayStart = None
) -> ProgressOut:
    since = checked_day_start(day_start)
    with review_errors():
        return ProgressOut.of(review_progress(_reviews(database, settings), reviewer, day_start=since))


@router.post(
    "/items/{item_id}/label",
    response_model=LabelOut,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Answer an item: one of the six labels, or skip / unsure (with an optional comment)",
)
def add_label(
    item_id: ItemId, body: LabelBody, reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep
) -> LabelOut:
    label = parse_answer(body.label)
    comment = checked_comment(body.comment, settings.review_max_comment_chars)
    with review_errors():
        given = LabelOut.of(_reviews(database, settings).add_label(item_id, reviewer, label, comment))
    if label in LABELS:  # skip / unsure are answers, not labels
        telemetry.LABELS_GIVEN.labels(reviewer=reviewer).inc()
    return given


@router.put(
    "/items/{item_id}/label",
    response_model=LabelOut,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Correct your answer for an item (the old one stays in the history)",
)
def correct_label(
    item_id: ItemId, body: LabelBody, reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep
) -> LabelOut:
    label = parse_answer(body.label)
    comment = checked_comment(body.comment, settings.review_max_comment_chars)
    with review_errors():
        return LabelOut.of(_reviews(database, settings).correct_label(item_id, reviewer, label, comment))


@router.post(
    "/undo",
    response_model=UndoResponse,
    responses={409: {"model": ErrorResponse}},
    summary="Retract your most recent answer; its item goes back to your queue",
)
def undo(reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep) -> UndoResponse:
    with review_errors():
        undone = _reviews(database, settings).undo_last(reviewer)
        return UndoResponse(undone=LabelOut.of(undone), item=_item(database, undone.item_id))


@router.get(
    "/items/{item_id}",
    response_model=ItemHistory,
    responses={404: {"model": ErrorResponse}},
    summary="One item with every answer it ever got (reviewers: items requested for review or answered by them; "
    "the admin token: any item)",
)
def item_history(item_id: ItemId, reader: ReviewReader, database: DatabaseDep, settings: SettingsDep) -> ItemHistory:
    with review_errors():  # an item the reviewer may not read is a 404 like a missing one: ids cannot be probed
        labels = _reviews(database, settings).history(item_id, reader=reader)
        return ItemHistory(item=_item(database, item_id), labels=[LabelOut.of(label) for label in labels])


@router.get(
    "/stats",
    response_model=ReviewStatsOut,
    summary="Queue length, your counts, the team's, and how far reviewers agree (Krippendorff's alpha, Cohen's kappa)",
)
def stats(reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep) -> ReviewStatsOut:
    with review_errors():
        result = _reviews(database, settings).stats(reviewer)
        agreement = read_agreement(database)
    return ReviewStatsOut(
        reviewer=reviewer,
        queue_length=result.queue_length,
        my_labels=result.my_labels,
        my_skips=result.my_skips,
        requested=result.requested,
        completed=result.completed,
        awaiting_adjudication=result.awaiting_adjudication,
        labels_per_item=settings.review_labels_per_item,
        by_reviewer=result.by_reviewer,
        by_label=result.by_label,
        second_opinion_share=settings.review_second_opinion_share if settings.review_labels_per_item == 1 else 0.0,
        agreement=AgreementOut.of(agreement),
    )


@router.get(
    "/adjudication",
    response_model=list[AdjudicationItem],
    summary="Items whose reviewers disagree (labels_per_item >= 2), waiting for a deciding label",
)
def adjudication_queue(
    reviewer: ReviewerName,
    database: DatabaseDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[AdjudicationItem]:
    with review_errors():
        disputed = _reviews(database, settings).adjudication_queue(limit=limit)
    return [
        AdjudicationItem(item=ReviewItem.of(item), labels=[LabelOut.of(label) for label in labels])
        for item, labels in disputed
    ]


@router.post(
    "/items/{item_id}/adjudicate",
    response_model=LabelOut,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Decide a disputed item (a later adjudication replaces an earlier one, history kept)",
)
def adjudicate(
    item_id: ItemId, body: AdjudicationBody, reviewer: ReviewerName, database: DatabaseDep, settings: SettingsDep
) -> LabelOut:
    label = parse_answer(body.label, allow_non_labels=False)
    comment = checked_comment(body.comment, settings.review_max_comment_chars)
    with review_errors():
        given = LabelOut.of(_reviews(database, settings).adjudicate(item_id, reviewer, label, comment))
    telemetry.LABELS_GIVEN.labels(reviewer=reviewer).inc()
    return given
