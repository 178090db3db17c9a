"""Logging hygiene end to end: the real `guardloop serve` process, with uvicorn's access log on and every logger at
DEBUG, is sent requests carrying planted secrets (API keys, the admin token, a reviewer token, wrong ones of each,
the database password, the LLM's API key) and planted user texts that enter the pool; afterwards everything the
process wrote (stdout, stderr, files under its data directory) is searched for each of them.

SECURITY.md promises: never request bodies or texts, API keys, reviewer or admin tokens, the LLM's API key or
database passwords in the logs. The in-process tests (tests/test_security.py) only see records that propagate to
pytest's capture; this one sees what an operator's log collector would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from guardloop.models.registry import ModelRegistry
from sqlalchemy.engine import make_url

from guardloop.storage import Database, LabelRequest, PoolRepository, ReviewerRepository
from tests.conftest import POSTGRES_ADMIN_DSN, free_port, wait_for
from tests.tiny_onnx import publish_tiny

pytestmark = pytest.mark.slow


def planted(kind: str) -> str:
    """A unique marker that can only appear in the output if the planted value itself leaked."""
    return f"{kind}-{uuid.uuid4().hex}"


def database_url_with_password(url: str, password: str) -> str:
    # The local PostgreSQL trusts loopback connections, so any password is accepted: it is planted, not checked.
    with psycopg.connect(POSTGRES_ADMIN_DSN) as connection:
        user = connection.execute("SELECT current_user").fetchone()[0]
    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown: the pool writer flushes and logs
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def everything_written(log: Path, data_dir: Path) -> str:
    written = [log.read_bytes()]
    written += [path.read_bytes() for path in sorted(data_dir.rglob("*")) if path.is_file()]
    return b"\n".join(written).decode("utf-8", errors="replace")


def test_the_running_service_logs_no_secret_and_no_user_text_at_debug(tmp_path, postgres_url):
    registry = ModelRegistry(tmp_path / "registry")
    version = publish_tiny(registry, tmp_path, seed=3)
    keys = {"bot-a": planted("api-key-a"), "bot-b": planted("api-key-b")}
    admin_token, db_password, llm_key = planted("admin-token"), planted("db-password"), planted("llm-key")
    wrong_key, wrong_token = planted("wrong-key"), planted("wrong-token")
    database_url = database_url_with_password(postgres_url, db_password)
    database = Database(database_url)
    database.ensure_schema()
    reviewer_token = ReviewerRepository(database).add("ann")
    pooled = [f"my landlord kept the deposit {planted('pooled-text')}" for _ in range(6)]
    refused_texts = [planted("refused-text") for _ in range(5)]
    comment = planted("review-comment")
    secrets = [*keys.values(), admin_token, db_password, llm_key, wrong_key, wrong_token, reviewer_token]

    port = free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "GUARDLOOP_REGISTRY_DIR": str(registry.root),
        "GUARDLOOP_DATA_DIR": str(data_dir),
        "GUARDLOOP_DATABASE_URL": database_url,
        "GUARDLOOP_API_KEYS": json.dumps(keys),
        "GUARDLOOP_ADMIN_TOKEN": admin_token,
        "GUARDLOOP_LLM_API_KEY": llm_key,
        "GUARDLOOP_ACCESS_LOG": "true",
        "GUARDLOOP_LOG_LEVEL": "DEBUG",
        "GUARDLOOP_POOL_SAMPLE_RATE": "1.0",  # every classified text is pooled
        "GUARDLOOP_POOL_FLUSH_SECONDS": "0.1",
        "GUARDLOOP_METRICS_REFRESH_SECONDS": "0.2",
        "GUARDLOOP_MAX_BODY_BYTES": "4096",
        "GUARDLOOP_MAX_TEXTS": "4",
        "GUARDLOOP_RATE_LIMIT_CLASSIFY_PER_KEY": "30/minute",
    }
    command = [sys.executable, "-m", "guardloop.cli", "serve", "--no-bootstrap", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(ready, timeout=60, interval=0.2), log.read_text()
        with httpx.Client(base_url=base, timeout=10) as client:
            send_traffic(client, keys, wrong_key, admin_token, wrong_token, pooled, refused_texts)
            pool = PoolRepository(database)
            assert wait_for(lambda: {item.text for item in pool.iter_items()} >= set(pooled), timeout=30)
            # A reviewer labels a pooled text, with a comment; a wrong token is refused.
            ids = [item.id for item in pool.iter_items() if item.text in pooled]
            pool.mark_requested([LabelRequest(ids[0], {"strategy": "test"}, 1.0)], at=datetime.now(UTC))
            ann = {"Authorization": f"Bearer {reviewer_token}"}
            queue = client.get("/review/queue", headers=ann)
            assert queue.status_code == 200 and queue.json()["items"][0]["text"] in pooled
            labeled = client.post(
                f"/review/items/{ids[0]}/label", json={"label": "legal-advice", "comment": comment}, headers=ann
            )
            assert labeled.status_code == 201
            assert client.get(f"/review/items/{ids[0]}", headers=ann).json()["item"]["text"] in pooled
            for token in (wrong_token, admin_token):
                assert client.get("/review/queue", headers={"Authorization": f"Bearer {token}"}).status_code == 403
            # The pool writer's error path: its table is gone while texts arrive; the failure is logged.
            with psycopg.connect(make_url(postgres_url).set(drivername="postgresql").render_as_string()) as conn:
                conn.execute("ALTER TABLE pool_items RENAME TO pool_items_away")
                conn.commit()
                outage_texts = [f"while the table is away {planted('outage-text')}" for _ in range(3)]
                for text in outage_texts:
                    auth = {"X-API-Key": keys["bot-b"]}
                    assert client.post("/classify", json={"text": text}, headers=auth).status_code == 200
                assert wait_for(lambda: "pool writer: cannot write" in log.read_text(), timeout=30), log.read_text()
                conn.execute("ALTER TABLE pool_items_away RENAME TO pool_items")
                conn.commit()
            pooled += outage_texts
    finally:
        stop(process)
        database.dispose()

    output = everything_written(log, data_dir)
    # The log is not trivial: access lines, DEBUG records and the model load are in it, so a leak would show.
    assert output.count('"POST /classify HTTP/1.1" 200') >= 5, output[-3000:]
    assert '"POST /classify HTTP/1.1" 413' in output and '"GET /review/queue HTTP/1.1" 403' in output
    assert " DEBUG " in output and f"now serving model {version}" in output
    assert "pool writer: cannot write" in output and "INSERT INTO pool_items" in output  # SQLAlchemy's statements
    leaked = [value for value in [*secrets, *pooled, *refused_texts, comment] if value in output]
    assert leaked == [], "\n".join(line for line in output.splitlines() if any(value in line for value in leaked))


def send_traffic(
    client: httpx.Client,
    keys: dict[str, str],
    wrong_key: str,
    admin_token: str,
    wrong_token: str,
    pooled: list[str],
    refused: list[str],
) -> None:
    """Accepted and refused requests carrying the planted values, through every route that takes them."""
    key_a, key_b = keys.values()
    for index, text in enumerate(pooled):
        auth = {"Authorization": f"Bearer {key_a}"} if index % 2 else {"X-API-Key": key_b}
        if index % 3 == 2:
            answer = client.post("/v1/moderations", json={"input": text}, headers=auth)
        else:
            answer = client.post("/classify", json={"text": text}, headers=auth)
        assert answer.status_code == 200, answer.text
    for auth in ({"Authorization": f"Bearer {wrong_key}"}, {"X-API-Key": wrong_key}):
        assert client.post("/classify", json={"text": refused[0]}, headers=auth).status_code == 403
    assert client.post("/classify", json={"text": refused[0]}).status_code == 401
    ok = {"X-API-Key": key_a}
    too_many = {"texts": [refused[1]] * 5}  # over GUARDLOOP_MAX_TEXTS
    assert client.post("/classify", json=too_many, headers=ok).status_code == 422
    assert client.post("/classify", json={"text": refused[2], "extra": refused[2]}, headers=ok).status_code == 422
    assert client.post("/classify", json={"text": refused[3] + "x" * 5000}, headers=ok).status_code == 413
    not_utf8 = f'{{"text": "{refused[4]} '.encode() + b'\xff\xfe"}'
    answer = client.post("/classify", content=not_utf8, headers=ok | {"content-type": "application/json"})
    assert answer.status_code == 400
    for token in (admin_token, wrong_token):
        client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
        client.get("/admin/pool", headers={"Authorization": f"Bearer {token}"})
    assert client.get("/admin/pool", headers={"Authorization": f"Bearer {admin_token}"}).status_code == 200
    limited = [client.post("/classify", json={"text": "hello"}, headers=ok).status_code for _ in range(40)]
    assert 429 in limited  # refused by rate: the key's bucket, keyed by a digest of the key
