"""`guardloop reviewers ...` and `guardloop pool stats | export | purge` as a user runs them."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from guardloop.models.registry import ModelRegistry
from sqlalchemy import select

from guardloop.storage import Database, PoolRepository, ReviewerRepository
from guardloop.storage.tables import Reviewer
from tests.pool_items import uncertain_record
from tests.test_cli import assert_one_line_error, run_cli
from tests.tiny_onnx import publish_tiny


def env_for(tmp_path: Path) -> dict[str, str]:
    return {"GUARDLOOP_DATA_DIR": str(tmp_path / "data"), "GUARDLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}


def fill(url: str, texts_and_ages: dict[str, float]) -> None:
    now = datetime.now(UTC)
    database = Database(url)
    database.ensure_schema()
    PoolRepository(database).write_batch(
        [uncertain_record(text, now - timedelta(days=age)) for text, age in texts_and_ages.items()]
    )


def test_reviewers_add_prints_the_token_once_and_stores_its_hash(tmp_path):
    env = env_for(tmp_path)
    added = run_cli("reviewers", "add", "ann", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("glr_") and "\n" not in token  # stdout is the token alone: easy to pipe
    assert "shown only now" in added.stderr
    database = Database(env["GUARDLOOP_DATABASE_URL"])
    assert ReviewerRepository(database).authenticate(token) == "ann"
    with database.read() as session:
        (row,) = session.scalars(select(Reviewer)).all()
    assert row.token_hash != token and token not in row.token_hash

    listed = run_cli("reviewers", "list", env=env)
    assert listed.returncode == 0 and "ann" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout + listed.stderr and row.token_hash not in listed.stdout

    assert_one_line_error(run_cli("reviewers", "add", "ann", env=env), "exists", "rotate")
    assert_one_line_error(run_cli("reviewers", "add", "bad name!", env=env), "not allowed")
    assert_one_line_error(run_cli("reviewers", "revoke", "nobody", env=env), "no reviewer 'nobody'")


def test_pool_stats_export_and_purge(tmp_path):
    env = env_for(tmp_path)
    fill(env["GUARDLOOP_DATABASE_URL"], {"fresh text": 0, "old text": 40, "very old text": 400})
    stats = run_cli("pool", "stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["items"] == 3

    out = tmp_path / "export" / "pool.jsonl"
    out.parent.mkdir()
    exported = run_cli("pool", "export", "--format", "jsonl", "--output", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(row["text"] for row in rows) == ["fresh text", "old text", "very old text"]
    assert {"text_hash", "seen_count", "scores", "uncertainty", "model_version", "first_seen"} <= set(rows[0])
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind

    assert_one_line_error(run_cli("pool", "export", "--format", "csv", env=env), "unsupported format 'csv'")

    purged = run_cli("pool", "purge", env=env)  # the default retention: 30 days
    assert purged.returncode == 0 and purged.stdout.startswith("purged 2 items")
    remaining = [row["text"] for row in map(json.loads, run_cli("pool", "export", env=env).stdout.splitlines())]
    assert remaining == ["fresh text"]


def test_a_bad_or_unreachable_database_is_one_line(tmp_path):
    bad = env_for(tmp_path) | {"GUARDLOOP_DATABASE_URL": "mysql://root@127.0.0.1/x"}
    assert_one_line_error(run_cli("pool", "stats", env=bad), "unsupported database 'mysql'")
    dead = env_for(tmp_path) | {"GUARDLOOP_DATABASE_URL": "postgresql://root:secret-pw@127.0.0.1:1/x"}
    result = run_cli("reviewers", "list", env=dead)
    assert_one_line_error(result, "unavailable")
    assert "secret-pw" not in result.stderr  # the password is masked in messages


@pytest.mark.slow
def test_bench_pool_runs_end_to_end_and_checks_the_pool(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    publish_tiny(registry, tmp_path, seed=1)
    result = run_cli(
        "bench",
        "pool",
        "--calls",
        "40",
        "--registry-dir",
        str(registry.root),
        "--uncertainty-threshold",
        "0.95",
        env=env_for(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "ratio on / off" in out and "pool on" in out and "pool off" in out
    assert "duplicate rows: 0 by hash, 0 by normalized text; hash mismatches 0" in out
    expected = re.search(r"uncertain rows (\d+) \(expected (\d+),", out)
    assert expected and expected.group(1) == expected.group(2)
    assert "dropped 0" in out


def test_bench_pool_refuses_an_empty_registry(tmp_path):
    result = run_cli("bench", "pool", "--registry-dir", str(tmp_path / "none"), env=env_for(tmp_path))
    assert_one_line_error(result, "no current model")
