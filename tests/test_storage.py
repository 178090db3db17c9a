"""The pool and review repositories on a real SQLite file and a real PostgreSQL database (same tests, both)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError

from guardloop.core.labels import LABELS
from guardloop.storage import (
    RANDOM_SAMPLE,
    UNCERTAIN,
    AlreadyAnswered,
    Database,
    InvalidAnswer,
    ItemComplete,
    ItemNotFound,
    LabelRequest,
    NothingToUndo,
    NotRequested,
    PoolRecord,
    PoolRepository,
    ReviewerError,
    ReviewerRepository,
    ReviewRepository,
    StorageError,
    upgrade_database,
)
from guardloop.storage.tables import Base, Label, PoolItem, Reviewer
from guardloop.storage.texts import normalize_text, redact, text_hash

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def record(text: str, *, label: str = "self-harm", uncertainty: float = 0.8, version: str = "v1", **kw) -> PoolRecord:
    scores = dict.fromkeys(LABELS, 0.1) | {label: 0.5}
    values = {
        "text": text,
        "label": label,
        "scores": scores,
        "uncertainty": uncertainty,
        "margin": 0.4,
        "model_version": version,
        "sampled_by": UNCERTAIN,
        "client_id": "bot-a",
        "seen_at": NOW,
    }
    return PoolRecord(**(values | kw))


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.ensure_schema()
    yield db
    db.dispose()


@pytest.fixture
def pool(database: Database) -> PoolRepository:
    return PoolRepository(database)


def requested_items(pool: PoolRepository, texts: list[str], priorities: list[float] | None = None) -> list[int]:
    pool.write_batch([record(t) for t in texts])
    by_text = {item.text: item.id for item in pool.iter_items()}
    ids = [by_text[t] for t in texts]
    priorities = priorities or [0.0] * len(ids)
    missing = pool.mark_requested(
        [
            LabelRequest(i, {"strategy": "cluster", "cluster": n, "uncertainty": 0.9, "cycle_id": "c1"}, p)
            for n, (i, p) in enumerate(zip(ids, priorities, strict=True))
        ],
        at=NOW,
    )
    assert missing == []
    return ids


# ------------------------------------------------------------------ schema
def test_migrations_create_exactly_the_declared_tables(database: Database):
    import guardloop.storage

    for module in pkgutil.iter_modules(guardloop.storage.__path__):  # every table module, whoever added it
        importlib.import_module(f"guardloop.storage.{module.name}")
    with database.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert diff == []
    assert {"pool_items", "labels", "reviewers", "alembic_version"} <= tables
    upgrade_database(database)  # running again is a no-op, not an error


def test_sqlite_runs_in_wal_mode(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'pool.db'}")
    db.ensure_schema()
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("mysql://x@h/db", "unsupported database"), ("sqlite://", "in-memory"), ("not a url", "not a URL")],
)
def test_bad_database_urls_are_refused_with_what_to_write(url, fragment):
    with pytest.raises(StorageError, match=fragment):
        Database(url)


# ------------------------------------------------------------------ pool writes
def test_a_repeated_text_raises_a_counter_instead_of_adding_a_row(pool):
    first = pool.write_batch([record("I want to  end it"), record("i want to end it"), record("other text")])
    assert (first.new_items, first.repeats) == (2, 1)
    later = NOW + timedelta(hours=1)
    second = pool.write_batch([record("  I WANT TO END IT ", seen_at=later, version="v2", uncertainty=0.6)])
    assert (second.new_items, second.repeats) == (0, 1)
    items = {item.text_hash: item for item in pool.iter_items()}
    assert len(items) == 2
    item = items[text_hash("i want to end it")]
    assert item.text == "I want to  end it"  # the first spelling is kept
    assert item.seen_count == 3
    assert (item.first_seen, item.last_seen) == (NOW, later)
    assert (item.model_version, item.uncertainty) == ("v2", 0.6)  # the newest model's view replaces the old one
    assert item.scores["self-harm"] == 0.5 and item.client_id == "bot-a"
    assert pool.duplicate_hashes() == 0
    stats = pool.stats()
    assert (stats.items, stats.seen_total, stats.uncertain_items) == (2, 4, 2)


def test_a_failing_batch_writes_nothing(pool):
    pool.write_batch([record("already here")])
    bad = record("bad one", label=None)  # violates NOT NULL in the middle of the batch
    with pytest.raises(IntegrityError):
        pool.write_batch([record("already here"), record("fresh text"), bad])
    (item,) = list(pool.iter_items())
    assert (item.text, item.seen_count) == ("already here", 1)


def test_nul_characters_are_stored_instead_of_wedging_the_writer(pool):
    pool.write_batch([record("nul\x00inside")])
    (item,) = list(pool.iter_items())
    assert item.text == "nul\ufffdinside"


def test_redaction_replaces_contacts_before_anything_is_stored(database):
    pool = PoolRepository(database, redact_contacts=True)
    pool.write_batch([record("mail me at jane.doe@example.org or call +1 (555) 123-4567, see https://x.io/a?b=c")])
    (item,) = list(pool.iter_items())
    assert item.text == "mail me at [EMAIL] or call [PHONE], see [URL]"
    assert item.text_hash == text_hash(item.text)
    exported = "".join(str(row) for row in pool.export())
    assert "jane.doe" not in exported and "555" not in exported


def test_stats_count_sampled_requested_and_labeled_items(pool, database):
    ids = requested_items(pool, ["a", "b"])
    pool.write_batch([record("confident", sampled_by=RANDOM_SAMPLE, uncertainty=0.1)])
    ReviewRepository(database).add_label(ids[0], "ann", "legal-advice")
    stats = pool.stats()
    assert (stats.items, stats.uncertain_items, stats.sampled_items) == (3, 2, 1)
    assert (stats.requested_items, stats.labeled_items) == (2, 1)
    assert stats.by_label == {"self-harm": 3}


# ------------------------------------------------------------------ retention
def test_purge_removes_old_unlabeled_items_and_keeps_the_labeled_ones(pool, database):
    old = NOW - timedelta(days=40)
    pool.write_batch([record("old and unlabeled", seen_at=old), record("old but labeled", seen_at=old)])
    pool.write_batch([record("recent", seen_at=NOW)])
    labeled_id = next(i.id for i in pool.iter_items() if i.text == "old but labeled")
    pool.mark_requested([LabelRequest(labeled_id, {"strategy": "topn"})], at=old)
    ReviewRepository(database).add_label(labeled_id, "ann", "medical-advice")

    assert pool.purge(older_than=NOW - timedelta(days=30)) == 1
    assert sorted(i.text for i in pool.iter_items()) == ["old but labeled", "recent"]
    assert pool.purge(older_than=NOW - timedelta(days=30), include_labeled=True) == 1
    assert [i.text for i in pool.iter_items()] == ["recent"]
    with database.read() as session:  # the labels went with their item
        assert session.scalar(select(func.count()).select_from(Label)) == 0


# ------------------------------------------------------------------ the queue
def test_requested_items_form_the_queue_in_priority_order(pool, database):
    pool.write_batch([record("never requested")])
    ids = requested_items(pool, ["low", "high", "middle"], [0.1, 0.9, 0.5])
    reviews = ReviewRepository(database)
    assert [item.text for item in reviews.queue("ann", limit=10)] == ["high", "middle", "low"]
    assert reviews.queue_length("ann") == 3
    item = reviews.queue("ann")[0]
    assert item.request_reason == {"strategy": "cluster", "cluster": 1, "uncertainty": 0.9, "cycle_id": "c1"}
    assert pool.mark_requested([LabelRequest(999_999, {})], at=NOW) == [999_999]
    assert pool.withdraw_requests([ids[0]]) == 1
    assert reviews.queue_length("ann") == 2


def test_labels_skip_correction_undo_and_history(pool, database):
    first, second = requested_items(pool, ["first", "second"], [2, 1])
    reviews = ReviewRepository(database)
    reviews.add_label(first, "ann", "self-harm", "clear case")
    with pytest.raises(AlreadyAnswered):
        reviews.add_label(first, "ann", "legal-advice")
    reviews.add_label(second, "ann", "skip", "not sure what this is")
    assert reviews.queue_length("ann") == 0
    assert reviews.queue_length("bob") == 1  # a skip leaves the item to the others

    corrected = reviews.correct_label(first, "ann", "emergency-situation")
    history = reviews.history(first)
    assert [(h.label, h.active, h.superseded_by) for h in history] == [
        ("self-harm", False, corrected.id),
        ("emergency-situation", True, None),
    ]
    undone = reviews.undo_last("ann")  # the correction: the answer it replaced comes back
    assert undone.id == corrected.id and undone.retracted_at is not None
    assert [(h.label, h.active) for h in reviews.history(first)] == [
        ("self-harm", True),
        ("emergency-situation", False),
    ]
    assert reviews.undo_last("ann").label == "skip"  # undo walks back in the order of the answers
    assert reviews.queue_length("ann") == 1
    with database.read() as session:
        rows = session.scalars(select(Label).order_by(Label.id)).all()
        assert len(rows) == 3  # nothing was deleted: every answer stays in the history
        assert [r.label for r in rows if r.active] == ["self-harm"]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r, ids: r.add_label(999_999, "ann", "self-harm"), ItemNotFound),
        (lambda r, ids: r.add_label(ids[1], "ann", "self-harm"), NotRequested),
        (lambda r, ids: r.add_label(ids[0], "ann", "violence"), InvalidAnswer),
        (lambda r, ids: r.add_label(ids[0], "ann", "self-harm", "x" * 20_000), InvalidAnswer),
        (lambda r, ids: r.correct_label(ids[0], "ann", "self-harm"), NothingToUndo),
        (lambda r, ids: r.undo_last("ann"), NothingToUndo),
    ],
)
def test_refused_answers_store_nothing(pool, database, call, error):
    ids = requested_items(pool, ["requested"])
    pool.write_batch([record("not requested")])
    ids.append(next(i.id for i in pool.iter_items() if i.text == "not requested"))
    with pytest.raises(error):
        call(ReviewRepository(database), ids)
    with database.read() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 0


def test_one_label_per_item_by_default(pool, database):
    (item,) = requested_items(pool, ["contested"])
    reviews = ReviewRepository(database)
    reviews.add_label(item, "ann", "legal-advice")
    assert reviews.queue_length("bob") == 0
    with pytest.raises(ItemComplete):
        reviews.add_label(item, "bob", "financial-advice")
    reviews.add_label(item, "bob", "skip")  # a skip is always accepted: it says nothing about the label
    (final,) = reviews.final_labels()
    assert (final.label, final.reviewers, final.predicted, final.adjudicated) == (
        "legal-advice",
        ["ann"],
        "self-harm",
        False,
    )


def test_two_labels_per_item_agreement_and_adjudication(pool, database):
    agreed, disputed = requested_items(pool, ["agreed", "disputed"], [1, 0])
    reviews = ReviewRepository(database, labels_per_item=2)
    reviews.add_label(agreed, "ann", "medical-advice")
    assert reviews.final_labels() == []  # one of two labels is not settled yet
    reviews.add_label(agreed, "bob", "medical-advice")
    reviews.add_label(disputed, "ann", "self-harm")
    reviews.add_label(disputed, "bob", "not-harmful")
    assert [f.item_id for f in reviews.final_labels()] == [agreed]
    ((item, labels),) = reviews.adjudication_queue()
    assert item.id == disputed and sorted(label.label for label in labels) == ["not-harmful", "self-harm"]
    with pytest.raises(ItemComplete):
        reviews.adjudicate(agreed, "carol", "self-harm")
    with pytest.raises(InvalidAnswer):
        reviews.adjudicate(disputed, "carol", "skip")
    reviews.adjudicate(disputed, "carol", "self-harm", "suicidal ideation")
    assert reviews.adjudication_queue() == []
    finals = {f.item_id: f for f in reviews.final_labels()}
    assert finals[disputed].label == "self-harm" and finals[disputed].adjudicated
    assert finals[disputed].reviewers == ["ann", "bob", "carol"]
    assert [f.item_id for f in reviews.final_labels(since=finals[agreed].labeled_at)] == [disputed]
    assert len(reviews.final_labels(cycle_id="c1")) == 2 and reviews.final_labels(cycle_id="other") == []
    stats = reviews.stats("ann")
    assert (stats.completed, stats.awaiting_adjudication, stats.my_labels) == (2, 0, 2)


# ------------------------------------------------------------------ reviewers
def test_reviewer_tokens_are_stored_only_as_hashes(database):
    reviewers = ReviewerRepository(database)
    token = reviewers.add("ann")
    assert token.startswith("glr_") and len(token) > 40
    assert reviewers.authenticate(token) == "ann"
    assert reviewers.authenticate(token + "x") is None
    with database.read() as session:
        (row,) = session.scalars(select(Reviewer)).all()
        assert token not in (row.token_hash, row.name)
    with pytest.raises(ReviewerError, match="exists"):
        reviewers.add("ann")
    with pytest.raises(ReviewerError, match="not allowed"):
        reviewers.add("<script>")
    new_token = reviewers.rotate("ann")
    assert reviewers.authenticate(token) is None and reviewers.authenticate(new_token) == "ann"
    reviewers.revoke("ann")
    assert reviewers.authenticate(new_token) is None
    assert [(r.name, r.revoked_at is not None) for r in reviewers.list()] == [("ann", True)]


# ------------------------------------------------------------------ texts (no database)
def test_normalization_ignores_case_width_and_spacing():
    fullwidth_hello = "\uff28\uff45\uff4c\uff4c\uff4f"
    assert normalize_text(f"  {fullwidth_hello}\tWORLD \n") == "hello world"
    assert text_hash("Hello World") == text_hash("hello   world") != text_hash("hello worlds")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to a.b-c@mail.example.co.uk today", "write to [EMAIL] today"),
        ("call 555-123-4567 or +44 20 7946 0958", "call [PHONE] or [PHONE]"),
        ("see www.example.com/path and http://x.org", "see [URL] and [URL]"),
        ("I owe $15,000 since 2024, room 12", "I owe $15,000 since 2024, room 12"),
    ],
)
def test_redaction(text, expected):
    assert redact(text) == expected


def test_the_tables_are_the_ones_the_trainer_relies_on():
    columns = {c.name for c in PoolItem.__table__.columns}
    assert {
        "text",
        "text_hash",
        "seen_count",
        "label",
        "scores",
        "uncertainty",
        "model_version",
        "client_id",
    } <= columns
    assert {"first_seen", "last_seen", "requested_at", "request_reason", "priority"} <= columns
    assert {"reviewer", "label", "comment", "created_at", "superseded_by", "active"} <= {
        c.name for c in Label.__table__.columns
    }
