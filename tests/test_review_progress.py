"""The review page's numbers over HTTP, on SQLite and PostgreSQL: progress (answered today, the queue, what the
cycle waiting for labels still needs) on GET /review/progress and with every queue answer, the explanation of each
item, and a wrong day_start refused with what to send."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from guardloop.storage import LabelRequest, PoolRepository
from guardloop.storage.cycles import AWAITING_LABELS, PROMOTED, CycleRepository
from tests.test_review_api import ReviewSetup, make_setup


@pytest.fixture
def review(settings, registry, tmp_path, database_url) -> Iterator[ReviewSetup]:
    yield from make_setup(settings, registry, tmp_path, database_url)


def in_cycle(review: ReviewSetup, cycle_id: str, texts: list[str], *, status: str = AWAITING_LABELS) -> None:
    cycles = CycleRepository(review.database)
    cycles.create(cycle_id, strategy="cluster", budget=len(texts), parent_version=None)
    cycles.update(cycle_id, status=status)
    PoolRepository(review.database).mark_requested(
        [LabelRequest(review.items[text], {"strategy": "cluster", "cycle_id": cycle_id}, 0.5) for text in texts],
        at=datetime.now(UTC),
    )


def progress(review: ReviewSetup, reviewer: str, **params) -> dict:
    response = review.client.get("/review/progress", params=params, headers=review.auth(reviewer))
    assert response.status_code == 200, response.text
    return response.json()


def test_progress_counts_todays_answers_and_what_the_waiting_cycle_still_needs(review):
    assert progress(review, "ann") == {
        "queue_length": 3,
        "my_labels": 0,
        "done_today": 0,
        "cycle_id": None,
        "cycle_requested": 0,
        "cycle_left": 0,
    }
    in_cycle(review, "old", ["low priority"], status=PROMOTED)  # a finished cycle is not "this cycle"
    in_cycle(review, "now", ["high priority", "middle priority"])
    for text, answer in (("high priority", "self-harm"), ("middle priority", "unsure"), ("low priority", "skip")):
        path = f"/review/items/{review.items[text]}/label"
        response = review.client.post(path, json={"label": answer}, headers=review.auth("ann"))
        assert response.status_code == 201, response.text

    ann = progress(review, "ann")
    # Today: the label and the "unsure" (a skip is not work done); the cycle: "middle" still needs a label.
    assert (ann["done_today"], ann["my_labels"], ann["queue_length"]) == (2, 1, 0)
    assert (ann["cycle_id"], ann["cycle_requested"], ann["cycle_left"]) == ("now", 2, 1)
    bob = progress(review, "bob")
    assert (bob["done_today"], bob["queue_length"], bob["cycle_left"]) == (0, 2, 1)

    # A day that began after the answers counts none of them; the reviewer's own midnight with its offset works.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert progress(review, "ann", day_start=later)["done_today"] == 0
    local_midnight = datetime.now(UTC).astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    assert progress(review, "ann", day_start=local_midnight.isoformat())["done_today"] == 2

    queue = review.client.get("/review/queue", headers=review.auth("bob")).json()
    assert queue["progress"] == bob and queue["queue_length"] == bob["queue_length"]
    (item,) = queue["items"]
    assert item["explanation"]["why"] and item["explanation"]["scored_when"] == "classified"


WRONG_DAY_STARTS = [
    ("2026-05-04T00:00:00", "day_start needs a UTC offset"),
    ("2001-01-01T00:00:00+00:00", "must be the start of your current day"),
    ("tomorrow", "day_start"),
]


def test_a_wrong_day_start_is_refused_with_what_to_send(settings, registry, tmp_path):
    for review in make_setup(settings, registry, tmp_path, f"sqlite:///{tmp_path / 'review.db'}"):
        for (day_start, message), path in itertools.product(WRONG_DAY_STARTS, ("/review/progress", "/review/queue")):
            response = review.client.get(path, params={"day_start": day_start}, headers=review.auth("ann"))
            assert response.status_code == 422 and message in response.text, (path, response.text)
        assert review.client.get("/review/progress").status_code == 401
