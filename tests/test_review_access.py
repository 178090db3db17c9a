"""Who reads which pooled text through the review API, on SQLite and PostgreSQL: a reviewer reads items requested
for review and items they answered; every other id is a 404 worded exactly like a missing one; the admin token
reads every item."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guardloop.storage import PoolRepository
from tests.conftest import ADMIN_TOKEN
from tests.test_review_api import ReviewSetup, make_setup

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def review(settings, registry, tmp_path, database_url) -> Iterator[ReviewSetup]:
    yield from make_setup(settings, registry, tmp_path, database_url)


def texts_seen_by_walking(review: ReviewSetup, headers: dict[str, str]) -> dict[int, str]:
    """What a caller reads by trying every id from 1 to a few past the largest."""
    seen = {}
    for item_id in range(1, max(review.items.values()) + 5):
        response = review.client.get(f"/review/items/{item_id}", headers=headers)
        if response.status_code == 200:
            seen[item_id] = response.json()["item"]["text"]
        else:
            assert response.status_code == 404, response.text
            assert response.json()["detail"] == f"no pool item {item_id}"  # unreadable reads as missing
    return seen


def test_a_reviewer_walking_the_ids_reads_only_requested_items(review):
    requested = {review.items[text]: text for text in ("low priority", "high priority", "middle priority")}
    assert texts_seen_by_walking(review, review.auth("bob")) == requested
    everything = {item_id: text for text, item_id in review.items.items()}
    assert texts_seen_by_walking(review, ADMIN) == everything  # the admin reads the never-requested one too


def test_a_reviewer_keeps_reading_what_they_answered_after_the_request_is_withdrawn(review):
    client, low = review.client, review.items["low priority"]
    assert client.post(f"/review/items/{low}/label", json={"label": "self-harm"}, headers=review.auth("ann")).is_success
    assert client.post("/review/undo", headers=review.auth("ann")).is_success  # nobody's live answer any more
    assert PoolRepository(review.database).withdraw_requests([low]) == 1

    mine = client.get(f"/review/items/{low}", headers=review.auth("ann"))
    assert mine.status_code == 200 and mine.json()["item"]["text"] == "low priority"
    assert [label["active"] for label in mine.json()["labels"]] == [False]
    assert client.get(f"/review/items/{low}", headers=review.auth("bob")).status_code == 404
    assert client.get(f"/review/items/{low}", headers=ADMIN).status_code == 200


def test_no_list_shows_a_never_requested_text(settings, registry, tmp_path):
    url = f"sqlite:///{tmp_path / 'lists.db'}"
    for review in make_setup(settings, registry, tmp_path, url, review_labels_per_item=2):
        client, bob = review.client, review.auth("bob")
        high = review.items["high priority"]
        client.post(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=review.auth("ann"))
        client.post(f"/review/items/{high}/label", json={"label": "not-harmful"}, headers=review.auth("carol"))
        queued = [item["text"] for item in client.get("/review/queue?limit=100", headers=bob).json()["items"]]
        disputed = [entry["item"]["text"] for entry in client.get("/review/adjudication", headers=bob).json()]
        assert disputed == ["high priority"]  # any reviewer may adjudicate: a requested item, readable by all
        assert "never requested" not in queued + disputed


def test_the_admin_token_reads_but_never_answers(review):
    never = review.items["never requested"]
    label = review.client.post(f"/review/items/{never}/label", json={"label": "self-harm"}, headers=ADMIN)
    assert label.status_code == 403 and "unknown or revoked" in label.json()["detail"]
    assert review.client.get("/review/queue", headers=ADMIN).status_code == 403
    wrong = {"Authorization": "Bearer not-the-admin-token"}
    assert review.client.get(f"/review/items/{never}", headers=wrong).status_code == 403
    assert review.client.get(f"/review/items/{never}").status_code == 401
