"""Labeling in Label Studio or Argilla: `pool export --format label-studio|argilla` and `pool import` round-trip
labels, reviewers and times (SQLite and PostgreSQL), the tools' own answers land as reviewer answers (a new
annotator, a changed answer as a correction), and a bad file imports nothing, with one readable line."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guardloop.core.labels import LABELS
from guardloop.storage import UNCERTAIN, Database, LabelRequest, PoolRecord, PoolRepository, ReviewRepository
from guardloop.storage.exchange import LabelExchange
from guardloop.storage.exchange_formats import ARGILLA, LABEL_STUDIO, ExchangeError, parse_records
from tests.conftest import temporary_postgres_database
from tests.test_cli import assert_one_line_error, run_cli

TEXTS = ["how do I appeal a parking fine", "chest pain and my arm is numb", "should I sell my shares now"]


def pooled(database: Database) -> list[int]:
    """The three texts, requested for review; their ids in TEXTS order."""
    database.ensure_schema()
    now = datetime.now(UTC)
    pool = PoolRepository(database)
    pool.write_batch(
        [
            PoolRecord(
                t,
                "legal-advice",
                dict.fromkeys(LABELS, 0.1) | {"legal-advice": 0.5},
                0.8,
                0.4,
                "v7",
                UNCERTAIN,
                "bot",
                now,
            )
            for t in TEXTS
        ]
    )
    ids = {item.text: item.id for item in pool.iter_items()}
    pool.mark_requested([LabelRequest(ids[t], {"cycle_id": "c1"}, 0.5) for t in TEXTS], at=now)
    return [ids[t] for t in TEXTS]


def answers(database: Database) -> set[tuple[str, str, str, datetime]]:
    """Every live review answer as (text, reviewer, label, time)."""
    reviews = ReviewRepository(database)
    texts = {item.id: item.text for item in PoolRepository(database).iter_items()}
    return {
        (texts[item_id], view.reviewer, view.label, view.created_at)
        for item_id in texts
        for view in reviews.history(item_id)
        if view.active and view.kind == "review"
    }


@contextmanager
def another_database(kind_of: str, tmp_path: Path) -> Iterator[Database]:
    if kind_of.startswith("sqlite"):
        database = Database(f"sqlite:///{tmp_path / 'elsewhere.db'}")
        yield database
        database.dispose()
        return
    with temporary_postgres_database() as url:
        database = Database(url)
        yield database
        database.dispose()


@pytest.fixture
def labeled(database_url: str) -> Iterator[tuple[Database, list[int]]]:
    database = Database(database_url)
    ids = pooled(database)
    reviews = ReviewRepository(database, labels_per_item=2)
    reviews.add_label(ids[0], "ann", "legal-advice", "fine appeal")
    reviews.add_label(ids[0], "bob", "legal-advice")
    reviews.add_label(ids[1], "ann", "emergency-situation")
    reviews.add_label(ids[2], "bob", "skip")
    yield database, ids
    database.dispose()


@pytest.mark.parametrize("fmt", [LABEL_STUDIO, ARGILLA])
def test_round_trip_keeps_labels_reviewers_and_times(labeled, fmt: str, database_url: str, tmp_path: Path) -> None:
    source, _ = labeled
    records = json.loads(json.dumps(list(LabelExchange(source).export(fmt, requested_only=True))))
    assert len(records) == 3
    first = next(r for r in records if (r.get("data") or r.get("fields"))["text"] == TEXTS[0])
    if fmt == LABEL_STUDIO:  # the model's guess as a pre-annotation; each answer an annotation of the choices
        (prediction,) = first["predictions"]
        assert prediction["model_version"] == "v7" and prediction["score"] == 0.5
        assert prediction["result"][0]["value"] == {"choices": ["legal-advice"]}
        assert [a["completed_by"] for a in first["annotations"]] == [{"email": "ann"}, {"email": "bob"}]
    else:
        assert first["suggestions"]["label"] == {"value": "legal-advice", "score": 0.5, "agent": "v7"}
        users = [r["user_id"] for r in first["responses"]["label"]]
        assert all(uuid.UUID(user) for user in users)  # Argilla user ids are UUIDs
        assert sorted(first["metadata"]["guardloop_reviewers"][u] for u in users) == ["ann", "bob"]

    with another_database(database_url, tmp_path) as elsewhere:
        pooled(elsewhere)
        outcome = LabelExchange(elsewhere).import_answers(parse_records(fmt, records))
        assert (outcome.new, outcome.corrected, outcome.unchanged, outcome.items) == (4, 0, 0, 3)
        assert answers(elsewhere) == answers(source)
        again = LabelExchange(elsewhere).import_answers(parse_records(fmt, records))
        assert (again.new, again.unchanged) == (0, 4)  # importing twice changes nothing


def test_answers_given_in_label_studio_land_as_reviewer_answers(labeled) -> None:
    database, ids = labeled
    tasks = list(LabelExchange(database).export(LABEL_STUDIO, requested_only=True))
    by_text = {t["data"]["text"]: t for t in tasks}
    when = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    by_text[TEXTS[2]]["annotations"].append(  # a Label Studio user (id 7) answers, as its JSON export writes it
        {
            "result": [
                {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["financial-advice"]}}
            ],
            "completed_by": 7,
            "created_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
    )
    ann = by_text[TEXTS[1]]["annotations"][0]
    ann["result"][0]["value"]["choices"] = ["medical-advice"]  # ann changed her mind in the tool
    ann["updated_at"] = when.isoformat()

    outcome = LabelExchange(database).import_answers(parse_records(LABEL_STUDIO, tasks))

    assert (outcome.new, outcome.corrected, outcome.unchanged) == (1, 1, 3)
    history = ReviewRepository(database).history(ids[1])
    assert [(v.label, v.active) for v in history] == [("emergency-situation", False), ("medical-advice", True)]
    assert history[0].superseded_by == history[1].id  # a correction: the old answer stays in the history
    new = next(v for v in ReviewRepository(database).history(ids[2]) if v.reviewer == "label-studio:7")
    assert (new.label, new.created_at) == ("financial-advice", when)


def test_a_bad_record_imports_nothing(labeled) -> None:
    database, _ = labeled
    before = answers(database)
    records = list(LabelExchange(database).export(ARGILLA, requested_only=True))
    records[0]["responses"]["label"].append({"value": "financial-advice", "user_id": str(uuid.uuid4())})  # valid
    records[2]["responses"]["label"].append({"value": "stonks", "user_id": str(uuid.uuid4())})
    with pytest.raises(ExchangeError, match="record 3: unknown label 'stonks'"):
        LabelExchange(database).import_answers(parse_records(ARGILLA, records))
    records[2]["responses"]["label"].pop()
    records[1]["fields"]["text"] = "a text from another database"
    with pytest.raises(ExchangeError, match="record 2: its text is not pool item"):
        LabelExchange(database).import_answers(parse_records(ARGILLA, records))
    assert answers(database) == before  # record 1's valid answer was not half-imported


def test_cli_export_and_import(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from guardloop.cli import app

    url = f"sqlite:///{tmp_path / 'p.db'}"
    database = Database(url)
    ids = pooled(database)
    ReviewRepository(database).add_label(ids[0], "ann", "legal-advice")
    env = {"GUARDLOOP_DATA_DIR": str(tmp_path / "data"), "GUARDLOOP_DATABASE_URL": url}
    out = tmp_path / "tasks.json"
    cli = CliRunner()  # in-process: fast; the refused import below runs as a user runs it

    exported = cli.invoke(
        app, ["pool", "export", "--format", "label-studio", "--requested-only", "--output", str(out)], env=env
    )
    assert exported.exit_code == 0, exported.output
    tasks = json.loads(out.read_text(encoding="utf-8"))
    tasks[1]["annotations"].append({"result": [], "was_cancelled": True, "completed_by": {"email": "cy@example.org"}})
    tasks[2]["annotations"].append({"result": [], "completed_by": 3})  # no choice: not an answer
    out.write_text(json.dumps(tasks), encoding="utf-8")

    refused = run_cli("pool", "import", str(out), "--format", "label-studio", env=env)
    assert_one_line_error(refused, "record 3", "0 choices", "nothing imported")
    del tasks[2]["annotations"][-1]
    out.write_text(json.dumps(tasks), encoding="utf-8")
    imported = cli.invoke(app, ["pool", "import", str(out), "--format", "label-studio"], env=env)
    assert imported.exit_code == 0, imported.output
    assert (
        "imported 1 answers for 2 items" in imported.output and "(1 new, 0 corrected, 1 unchanged)" in imported.output
    )
    assert ("cy@example.org", "skip") in {(v.reviewer, v.label) for v in ReviewRepository(database).history(ids[1])}
    database.dispose()
