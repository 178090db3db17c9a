"""Pool logging through the real service: which /classify results land in the pool (SQLite and PostgreSQL),
API keys, redaction, the retention job, and /classify answering while the database is unreachable."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app

from guardloop.core.settings import Settings
from guardloop.storage import RANDOM_SAMPLE, UNCERTAIN, Database, LabelRequest, PoolRepository, ReviewRepository
from guardloop.storage.texts import normalize_text
from tests.conftest import ADMIN_TOKEN, free_port, wait_for
from tests.keyword_onnx import publish_keyword_model

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A keyword pushes its label far up (a confident verdict); a text without one gets a mild not-harmful bias,
# which leaves the model unsure (normalized entropy about 0.74).
KEYWORDS = {"pills": ("self-harm", 120.0), "lawyer": ("legal-advice", 120.0), "mortgage": ("financial-advice", 120.0)}
THRESHOLD = 0.5


@pytest.fixture
def keyword_model(registry, tmp_path: Path) -> str:
    return publish_keyword_model(registry, tmp_path, KEYWORDS)


def pool_settings(settings: Settings, **overrides) -> Settings:
    defaults = {"pool_flush_seconds": 0.05, "pool_uncertainty_threshold": THRESHOLD}
    return Settings(**(settings.model_dump() | defaults | overrides))  # validated, unlike model_copy


def drained(client: TestClient) -> dict:
    """The writer's counters once it has written everything it was offered."""

    def done() -> bool:
        writer = client.get("/admin/pool", headers=ADMIN).json()["writer"]
        return writer["queued"] == 0 and writer["offered"] == writer["written"] + writer["duplicates"]

    assert wait_for(done, timeout=20)
    return client.get("/admin/pool", headers=ADMIN).json()


def mixed_traffic(n: int, seed: int = 5) -> list[str]:
    """New unsure texts, new confident ones (a keyword), and repeats in other case and spacing."""
    rng = random.Random(seed)
    sent: list[str] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.35 or not sent:
            sent.append(f"something happened at work today number {i}")
        elif roll < 0.7:
            sent.append(f"the {rng.choice(list(KEYWORDS))} question {i}")
        else:
            earlier = rng.choice(sent)
            sent.append(rng.choice([earlier, earlier.upper(), f"  {earlier}  ".replace(" ", "  ")]))
    return sent


def test_uncertain_traffic_and_a_sample_of_the_rest_land_once_each(settings, keyword_model, database_url):
    settings = pool_settings(settings, database_url=database_url, pool_sample_rate=0.1)
    texts = mixed_traffic(300)
    uncertain_calls: Counter[str] = Counter()
    confident_calls = 0
    with TestClient(create_app(settings)) as client:
        for text in texts:
            response = client.post("/classify", json={"text": text}, headers={"X-Client-Id": "bot-7"})
            assert response.status_code == 200
            result = response.json()["results"][0]
            if result["uncertainty"] > THRESHOLD:
                uncertain_calls[normalize_text(text)] += 1
            else:
                confident_calls += 1
        status = drained(client)

    assert uncertain_calls and confident_calls  # the mix really has both kinds
    pool = PoolRepository(Database(database_url))
    items = list(pool.iter_items())
    uncertain = [item for item in items if item.sampled_by == UNCERTAIN]
    sampled = [item for item in items if item.sampled_by == RANDOM_SAMPLE]
    # Every uncertain text exactly once, with all its sightings (repeats in other case or spacing included).
    assert {normalize_text(item.text): item.seen_count for item in uncertain} == dict(uncertain_calls)
    assert all(item.uncertainty > THRESHOLD for item in uncertain)
    # About 10% of the confident calls, sampled with the seeded RNG.
    sampled_calls = sum(item.seen_count for item in sampled)
    assert 0.03 * confident_calls <= sampled_calls <= 0.2 * confident_calls
    assert all(any(word in item.text.lower() for word in KEYWORDS) for item in sampled)
    # No duplicate rows: one row per normalized text and per hash.
    assert len({normalize_text(item.text) for item in items}) == len(items)
    assert pool.duplicate_hashes() == 0
    assert {item.client_id for item in items} == {"bot-7"}
    assert {item.model_version for item in items} == {keyword_model}
    assert status["pool"]["items"] == len(items)
    assert status["writer"]["written"] == len(items) and status["writer"]["dropped"] == 0


def test_a_conversation_pools_its_user_turn_not_the_context_window(settings, keyword_model, tmp_path):
    with TestClient(create_app(pool_settings(settings))) as client:
        messages = [
            {"role": "user", "content": "earlier turn about my day"},
            {"role": "assistant", "content": "tell me more"},
            {"role": "user", "content": "and then something else happened"},
        ]
        assert client.post("/classify", json={"messages": messages}).status_code == 200
        drained(client)
    texts = [item.text for item in PoolRepository(Database(settings.database_url_value)).iter_items()]
    assert texts == ["and then something else happened"]


def test_pool_logging_can_be_switched_off(settings, keyword_model):
    with TestClient(create_app(pool_settings(settings, pool_enabled=False))) as client:
        for i in range(20):
            assert client.post("/classify", json={"text": f"unsure text {i}"}).status_code == 200
        status = client.get("/admin/pool", headers=ADMIN).json()
    assert status["enabled"] is False and status["writer"] is None
    assert status["pool"]["items"] == 0


def test_redaction_happens_before_the_text_is_stored(settings, keyword_model):
    with TestClient(create_app(pool_settings(settings, pool_redact=True))) as client:
        text = "write to me at someone@example.com or ring 0171 234 5678"
        assert client.post("/classify", json={"text": text}).status_code == 200
        drained(client)
    (item,) = PoolRepository(Database(settings.database_url_value)).iter_items()
    assert item.text == "write to me at [EMAIL] or ring [PHONE]"


def test_api_keys_guard_classify_and_moderations_and_name_the_client(settings, keyword_model):
    keys = {"bot-a": "key-aaaaaaaaaaaaaaaaaaaa", "bot-b": "key-bbbbbbbbbbbbbbbbbbbb"}
    with TestClient(create_app(pool_settings(settings, api_keys=keys))) as client:
        missing = client.post("/classify", json={"text": "hello there"})
        assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
        wrong = client.post("/classify", json={"text": "hello there"}, headers={"X-API-Key": "key-nope"})
        assert wrong.status_code == 403 and wrong.json()["detail"] == "wrong API key"
        bearer = {"Authorization": "Bearer key-bbbbbbbbbbbbbbbbbbbb"}
        assert client.post("/classify", json={"text": "hello there"}, headers=bearer).status_code == 200
        assert client.post("/v1/moderations", json={"input": "hello"}).status_code == 401
        assert client.post("/v1/moderations", json={"input": "hello"}, headers=bearer).status_code == 200
        # A client cannot claim another name when keys are on: the key names it.
        headers = {"X-API-Key": "key-aaaaaaaaaaaaaaaaaaaa", "X-Client-Id": "bot-b"}
        assert client.post("/classify", json={"text": "second text"}, headers=headers).status_code == 200
        drained(client)
    items = {item.text: item.client_id for item in PoolRepository(Database(settings.database_url_value)).iter_items()}
    assert items == {"hello there": "bot-b", "hello": "bot-b", "second text": "bot-a"}


def test_without_api_keys_classify_needs_none(settings, keyword_model):
    with TestClient(create_app(pool_settings(settings))) as client:
        assert client.post("/classify", json={"text": "hello"}).status_code == 200


def test_the_retention_job_purges_unlabeled_items_and_keeps_labeled_ones(settings, keyword_model):
    # First the items are pooled and one is labeled, under a retention nothing reaches; only then does a service
    # with a 1.5 s retention start on the same database, so the purge can never overtake the label.
    database = Database(pool_settings(settings).database_url_value)
    with TestClient(create_app(pool_settings(settings))) as client:
        for text in ("keep me, I get a label", "forget me"):
            assert client.post("/classify", json={"text": text}).status_code == 200
        drained(client)
    pool = PoolRepository(database)
    keep = next(item.id for item in pool.iter_items() if item.text.startswith("keep"))
    pool.mark_requested([LabelRequest(keep, {"strategy": "topn"})], at=next(pool.iter_items()).first_seen)
    ReviewRepository(database).add_label(keep, "ann", "not-harmful")
    assert pool.count() == 2
    purging = pool_settings(settings, pool_retention_days=1.5 / 86_400, pool_purge_interval_seconds=0.2)
    with TestClient(create_app(purging)):
        assert wait_for(lambda: pool.count() == 1, timeout=30)
    assert [item.id for item in pool.iter_items()] == [keep]


def test_classify_answers_while_the_database_is_unreachable(settings, keyword_model):
    # Nothing listens on this port: every connection is refused, from start-up on.
    dead = f"postgresql+psycopg://127.0.0.1:{free_port()}/guardloop"

    def timed_classify(client: TestClient) -> list[float]:
        latencies = []
        for i in range(60):
            start = time.perf_counter()
            response = client.post("/classify", json={"text": f"unsure text number {i}"})
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
        return latencies

    # The baseline, measured here and now on this machine: the same requests with no pool at all.
    with TestClient(create_app(pool_settings(settings, pool_enabled=False))) as client:
        baseline = timed_classify(client)
    settings = pool_settings(settings, database_url=dead, pool_queue_size=10, pool_batch_size=5)
    with TestClient(create_app(settings)) as client:
        latencies = timed_classify(client)
        status = client.get("/admin/pool", headers=ADMIN).json()
        review = client.get("/review/queue", headers={"Authorization": "Bearer glr_whatever"})
    # Nobody waits for the database: a request that did (a connect attempt, a retry's backoff) would take far
    # longer than the pool-free baseline. Medians, so one slow moment of a busy machine does not decide.
    assert statistics.median(latencies) < 5 * statistics.median(baseline) + 0.05, (latencies, baseline)
    assert status["writer"]["dropped"] >= 60 - 10 - 5 and status["writer"]["write_errors"] >= 1
    assert status["pool"] is None and "unavailable" in status["database_error"]
    assert review.status_code == 503 and "database unavailable" in review.json()["detail"]
