"""The review API over HTTP on SQLite and PostgreSQL: the queue, labels with corrections and undo, stats,
adjudication, and every refused request a clear 4xx that stores nothing."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from sqlalchemy import func, select

from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import Database, LabelRequest, PoolRepository, ReviewerRepository
from guardloop.storage.tables import Label
from tests.conftest import ADMIN_TOKEN
from tests.pool_items import uncertain_record
from tests.tiny_onnx import publish_tiny


@dataclass
class ReviewSetup:
    client: TestClient
    database: Database
    tokens: dict[str, str]
    items: dict[str, int]  # text -> id

    def auth(self, reviewer: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[reviewer]}"}

    def label_rows(self) -> int:
        with self.database.read() as session:
            return session.scalar(select(func.count()).select_from(Label)) or 0


def seed_pool(database: Database) -> dict[str, int]:
    pool = PoolRepository(database)
    now = datetime.now(UTC)
    texts = {"low priority": 0.1, "high priority": 0.9, "middle priority": 0.5, "never requested": None}
    pool.write_batch([uncertain_record(text, now) for text in texts])
    ids = {item.text: item.id for item in pool.iter_items()}
    pool.mark_requested(
        [
            LabelRequest(ids[text], {"strategy": "cluster", "cluster": n, "uncertainty": 0.9}, priority)
            for n, (text, priority) in enumerate(texts.items())
            if priority is not None
        ],
        at=now,
    )
    return ids


def make_setup(settings: Settings, registry, tmp_path, database_url: str, **overrides) -> Iterator[ReviewSetup]:
    publish_tiny(registry, tmp_path, seed=1)
    settings = Settings(**(settings.model_dump() | {"database_url": database_url} | overrides))
    database = Database(database_url)
    database.ensure_schema()
    reviewers = ReviewerRepository(database)
    tokens = {name: reviewers.add(name) for name in ("ann", "bob", "carol")}
    items = seed_pool(database)
    with TestClient(create_app(settings)) as client:
        yield ReviewSetup(client, database, tokens, items)
    database.dispose()


@pytest.fixture
def review(settings, registry, tmp_path, database_url) -> Iterator[ReviewSetup]:
    yield from make_setup(settings, registry, tmp_path, database_url)


@pytest.fixture
def review_sqlite(settings, registry, tmp_path) -> Iterator[ReviewSetup]:
    yield from make_setup(settings, registry, tmp_path, f"sqlite:///{tmp_path / 'review.db'}")


# ------------------------------------------------------------------ refused requests
REFUSALS = [
    ("missing token", None, "high priority", {"label": "self-harm"}, 401, "missing reviewer token"),
    ("wrong token", "glr_not-a-real-token", "high priority", {"label": "self-harm"}, 403, "unknown or revoked"),
    ("admin token", ADMIN_TOKEN, "high priority", {"label": "self-harm"}, 403, "unknown or revoked"),
    ("unknown item", "ann", 987_654, {"label": "self-harm"}, 404, "no pool item 987654"),
    ("not requested", "ann", "never requested", {"label": "self-harm"}, 409, "not requested"),
    ("invalid label", "ann", "high priority", {"label": "violence"}, 422, "unknown label 'violence'"),
    ("empty label", "ann", "high priority", {"label": ""}, 422, "unknown label"),
    ("no label", "ann", "high priority", {"comment": "hm"}, 422, "body.label"),
    ("extra field", "ann", "high priority", {"label": "self-harm", "reviewer": "bob"}, 422, "body.reviewer"),
    ("1 MB comment", "ann", "high priority", {"label": "skip", "comment": "x" * 1_000_000}, 422, "body.comment"),
    ("1 MiB body", "ann", "high priority", {"label": "skip", "comment": "x" * 1_048_576}, 413, "larger than"),
    ("long comment", "ann", "high priority", {"label": "skip", "comment": "y" * 2001}, 422, "at most 2000"),
]


@pytest.mark.parametrize(("case", "who", "item", "body", "status", "fragment"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_label_requests_are_clear_4xx_and_store_nothing(review_sqlite, case, who, item, body, status, fragment):
    review = review_sqlite
    headers = {}
    if who is not None:
        headers["Authorization"] = f"Bearer {review.tokens.get(who, who)}"
    item_id = review.items.get(item, item)
    response = review.client.post(f"/review/items/{item_id}/label", json=body, headers=headers)
    assert response.status_code == status, response.text[:300]
    assert fragment in response.json()["detail"]
    assert review.label_rows() == 0


def test_refusals_on_both_databases(review):
    """The same refusals on SQLite and PostgreSQL, including labeling an item twice."""
    high = review.items["high priority"]
    ann = review.auth("ann")
    assert review.client.post(f"/review/items/{high}/label", json={"label": "self-harm"}).status_code == 401
    wrong = {"Authorization": "Bearer glr_wrong"}
    assert (
        review.client.post(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=wrong).status_code == 403
    )
    assert review.client.post("/review/items/999999/label", json={"label": "self-harm"}, headers=ann).status_code == 404
    assert review.client.post(f"/review/items/{high}/label", json={"label": "nope"}, headers=ann).status_code == 422
    big = {"label": "skip", "comment": "x" * 1_000_000}
    assert review.client.post(f"/review/items/{high}/label", json=big, headers=ann).status_code == 422
    assert review.label_rows() == 0

    assert (
        review.client.post(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=ann).status_code == 201
    )
    twice = review.client.post(f"/review/items/{high}/label", json={"label": "legal-advice"}, headers=ann)
    assert twice.status_code == 409 and "already answered" in twice.json()["detail"]
    assert "PUT" in twice.json()["detail"]  # says what to do instead
    assert review.label_rows() == 1


def test_a_revoked_reviewer_is_refused(review_sqlite):
    ReviewerRepository(review_sqlite.database).revoke("bob")
    response = review_sqlite.client.get("/review/queue", headers=review_sqlite.auth("bob"))
    assert response.status_code == 403


# ------------------------------------------------------------------ the happy path
def test_queue_label_correct_undo_and_stats(review):
    client, ann, bob = review.client, review.auth("ann"), review.auth("bob")
    queue = client.get("/review/queue?limit=10", headers=ann).json()
    assert [item["text"] for item in queue["items"]] == ["high priority", "middle priority", "low priority"]
    assert (queue["queue_length"], queue["my_labels"], queue["labels_per_item"]) == (3, 0, 1)
    top = queue["items"][0]
    assert top["predicted_label"] == "medical-advice" and top["scores"][0] == {"label": "medical-advice", "score": 0.5}
    assert top["reason"] == {"strategy": "cluster", "cluster": 1, "uncertainty": 0.9}
    assert "client_id" not in top  # reviewers do not need to know which client sent it

    high, middle = review.items["high priority"], review.items["middle priority"]
    created = client.post(f"/review/items/{high}/label", json={"label": "Self Harm"}, headers=ann)  # an alias
    assert created.status_code == 201
    assert created.json()["label"] == "self-harm" and created.json()["reviewer"] == "ann"
    skipped = client.post(f"/review/items/{middle}/label", json={"label": "skip", "comment": " odd one "}, headers=ann)
    assert skipped.json()["comment"] == "odd one"

    assert client.get("/review/queue", headers=ann).json()["queue_length"] == 1
    assert client.get("/review/queue", headers=bob).json()["queue_length"] == 2  # bob may still take the skipped one

    corrected = client.put(f"/review/items/{high}/label", json={"label": "emergency-situation"}, headers=ann)
    assert corrected.status_code == 200
    nothing = client.put(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=bob)
    assert nothing.status_code == 409

    history = client.get(f"/review/items/{high}", headers=bob).json()
    assert [(h["label"], h["active"]) for h in history["labels"]] == [
        ("self-harm", False),
        ("emergency-situation", True),
    ]
    assert history["labels"][0]["superseded_by"] == history["labels"][1]["id"]

    undone = client.post("/review/undo", headers=ann).json()
    assert undone["undone"]["label"] == "emergency-situation" and undone["item"]["id"] == high
    stats = client.get("/review/stats", headers=ann).json()
    assert stats["reviewer"] == "ann"
    assert (stats["my_labels"], stats["my_skips"], stats["completed"], stats["requested"]) == (1, 1, 1, 3)
    assert stats["by_label"] == {"self-harm": 1}
    assert client.post("/review/undo", headers=bob).status_code == 409  # bob has nothing to undo


def test_two_labels_per_item_and_adjudication(settings, registry, tmp_path):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    for review in make_setup(settings, registry, tmp_path, url, review_labels_per_item=2):
        client = review.client
        high = review.items["high priority"]
        first = client.post(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=review.auth("ann"))
        second = client.post(f"/review/items/{high}/label", json={"label": "not-harmful"}, headers=review.auth("bob"))
        assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
        third = client.post(f"/review/items/{high}/label", json={"label": "self-harm"}, headers=review.auth("carol"))
        assert third.status_code == 409 and "already has the 2 label(s)" in third.json()["detail"]
        (disputed,) = client.get("/review/adjudication", headers=review.auth("carol")).json()
        assert disputed["item"]["id"] == high and len(disputed["labels"]) == 2
        bad = client.post(f"/review/items/{high}/adjudicate", json={"label": "skip"}, headers=review.auth("carol"))
        assert bad.status_code == 422
        decided = client.post(
            f"/review/items/{high}/adjudicate", json={"label": "self-harm"}, headers=review.auth("carol")
        )
        assert decided.status_code == 201 and decided.json()["kind"] == "adjudication"
        assert client.get("/review/adjudication", headers=review.auth("carol")).json() == []
        stats = client.get("/review/stats", headers=review.auth("carol")).json()
        assert (stats["completed"], stats["awaiting_adjudication"], stats["labels_per_item"]) == (1, 0, 2)


# ------------------------------------------------------------------ secrets, page, admin
def test_tokens_never_reach_the_logs(review_sqlite, caplog):
    caplog.set_level(logging.DEBUG)
    client = review_sqlite.client
    token = review_sqlite.tokens["ann"]
    client.get("/review/queue", headers={"Authorization": f"Bearer {token}"})
    client.get("/review/queue", headers={"Authorization": "Bearer glr_wrong-secret-value"})
    client.get("/admin/pool", headers={"Authorization": "Bearer wrong-admin-secret"})
    # In process, with the test client: this sees what the app's own code logs. What uvicorn and SQLAlchemy write
    # at DEBUG in the real service process is searched by tests/test_log_hygiene.py.
    assert caplog.records
    assert (
        token not in caplog.text and "wrong-secret-value" not in caplog.text and "wrong-admin-secret" not in caplog.text
    )


def test_the_review_page_is_served_with_a_strict_policy_and_no_inline_code(review_sqlite):
    client = review_sqlite.client
    page = client.get("/review")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []  # every script is a file: CSP can forbid inline ones
    assert re.search(r"\son[a-z]+\s*=", html) is None  # no inline event handlers either
    for key, label in enumerate(LABELS, start=1):
        assert f'data-label="{label}" data-key="{key}"' in html
    assert '<label for="token">' in html and '<label for="comment">' in html  # real labels for the inputs
    script = client.get("/review/assets/review.js")
    assert script.status_code == 200 and "textContent" in script.text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script.text)
    assert client.get("/review/assets/review.css").status_code == 200
    assert client.get("/review/assets/..%2Fapp.py").status_code == 404


def test_pool_admin_needs_the_admin_token(review_sqlite):
    client = review_sqlite.client
    assert client.get("/admin/pool").status_code == 401
    assert client.get("/admin/pool", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/admin/pool", headers=review_sqlite.auth("ann")).status_code == 403
    ok = client.get("/admin/pool", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200 and ok.json()["pool"]["requested_items"] == 3
    time.sleep(0.3)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    purge = client.post("/admin/pool/purge?older_than_days=0.000002", headers=admin)  # 0.17 s
    assert purge.status_code == 200 and purge.json()["purged"] == 4  # nothing labeled yet
