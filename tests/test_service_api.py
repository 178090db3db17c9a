"""The HTTP contract of /classify, health, model info and admin reload, on real ONNX Runtime sessions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app

from guardloop.core.labels import LABELS
from tests.conftest import ADMIN_TOKEN
from tests.tiny_onnx import publish_tiny

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client(settings, registry, tmp_path: Path):
    publish_tiny(registry, tmp_path, seed=1)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_health_and_readiness_without_a_model(settings):
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "no model" in ready.json()["reason"]
        response = client.post("/classify", json={"text": "hello"})
        assert response.status_code == 503
        assert "no model loaded" in response.json()["detail"]


def test_classify_one_text_returns_the_full_verdict(client, registry):
    response = client.post("/classify", json={"text": "I've lived everything I want to live"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == registry.current()
    assert len(body["request_id"]) == 32
    (result,) = body["results"]
    assert set(result["scores"]) == set(LABELS)
    assert math.isclose(sum(result["scores"].values()), 1.0, abs_tol=1e-4)
    assert result["label"] == max(result["scores"], key=result["scores"].get)
    assert result["confidence"] == pytest.approx(result["scores"][result["label"]])
    assert 0.0 <= result["uncertainty"] <= 1.0
    expected_flag = result["label"] != "not-harmful" and result["confidence"] >= 0.5
    assert result["flagged"] is expected_flag


def test_request_ids_differ(client):
    ids = {client.post("/classify", json={"text": "hi"}).json()["request_id"] for _ in range(5)}
    assert len(ids) == 5


def test_texts_are_answered_in_order_and_match_single_calls(client):
    texts = ["my code is killing me", "can my landlord keep my deposit", "chest pain right now", "hello"]
    batch = client.post("/classify", json={"texts": texts}).json()["results"]
    singles = [client.post("/classify", json={"text": t}).json()["results"][0] for t in texts]
    assert [r["label"] for r in batch] == [r["label"] for r in singles]
    for a, b in zip(batch, singles, strict=True):
        for label in LABELS:
            assert a["scores"][label] == pytest.approx(b["scores"][label], abs=1e-5)


def test_uncertainty_is_normalized_entropy(client):
    result = client.post("/classify", json={"text": "what is the capital of France"}).json()["results"][0]
    probs = list(result["scores"].values())
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    assert result["uncertainty"] == pytest.approx(entropy / math.log(6), abs=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"text": ""}, 422, "empty"),
        ({"text": "   \n "}, 422, "empty"),
        ({"text": "x" * 100_000}, 422, "at most 4000"),
        ({"texts": ["hi"] * 1000}, 422, "at most 64"),
        ({"texts": []}, 422, "at least one"),
        ({"text": 42}, 422, "valid string"),
        ({"texts": "not a list"}, 422, "valid list"),
        ({"texts": ["ok", 3]}, 422, "texts.1"),
        ({}, 422, "exactly one"),
        ({"text": "a", "texts": ["b"]}, 422, "exactly one"),
        ({"txt": "typo"}, 422, "txt"),
    ],
)
def test_bad_bodies_get_a_clear_4xx(client, body, status, fragment):
    response = client.post("/classify", json=body)
    assert response.status_code == status
    assert fragment in response.json()["detail"]


def test_invalid_json_and_invalid_utf8_are_4xx(client):
    bad_json = client.post("/classify", content=b'{"text": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 422
    bad_utf8 = client.post(
        "/classify", content=b'{"text": "\xff\xfe oops"}', headers={"content-type": "application/json"}
    )
    assert 400 <= bad_utf8.status_code < 500
    assert client.get("/healthz").status_code == 200


def test_oversized_body_refused_before_parsing(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    small = settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_app(small)) as client:
        response = client.post("/classify", json={"text": "y" * 5000})
        assert response.status_code == 413
        assert "2048" in response.json()["detail"]
        assert client.post("/classify", json={"text": "fine"}).status_code == 200


def test_limits_follow_settings(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    tight = settings.model_copy(update={"max_texts": 2, "max_text_chars": 10})
    with TestClient(create_app(tight)) as client:
        assert client.post("/classify", json={"texts": ["a", "b", "c"]}).status_code == 422
        assert client.post("/classify", json={"text": "01234567890"}).status_code == 422
        assert client.post("/classify", json={"texts": ["a", "b"]}).status_code == 200


def test_models_current_describes_the_served_model(client, registry):
    info = client.get("/models/current").json()
    assert info["version"] == registry.current()
    assert info["labels"] == list(LABELS)
    assert info["thresholds"] == dict.fromkeys(LABELS, 0.5)
    assert info["limits"] == {"max_texts": 64, "max_text_chars": 4000}


def test_openapi_documents_classify_with_examples(client):
    spec = client.get("/openapi.json").json()
    assert "/classify" in spec["paths"]
    schema = spec["components"]["schemas"]["ClassifyRequest"]
    assert schema["examples"]


def test_openapi_documents_the_client_id_header_on_both_classifying_routes_and_no_secret_header(client):
    """client_identity reads its headers from the request (no FastAPI parameters); /docs still shows X-Client-Id,
    and never the API-key headers."""
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/classify", "/v1/moderations"):
        headers = {p["name"] for p in paths[path]["post"].get("parameters", []) if p["in"] == "header"}
        assert headers == {"X-Client-Id"}, path


def test_admin_reload_requires_the_admin_token(client):
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert "wrong admin token" in wrong.json()["detail"]
    ok = client.post("/admin/reload", headers=ADMIN)
    assert ok.status_code == 200
    assert ok.json()["swapped"] is False


def test_admin_disabled_without_a_configured_token(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings.model_copy(update={"admin_token": None}))) as client:
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 403
        assert "GUARDLOOP_ADMIN_TOKEN" in response.json()["detail"]


def test_admin_reload_swaps_to_a_newly_published_version(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path, seed=1)
    # A long poll interval, so that the reload (not the poller) is what swaps.
    with TestClient(create_app(settings.model_copy(update={"registry_poll_seconds": 600}))) as client:
        new = publish_tiny(registry, tmp_path, favour="legal-advice", seed=2)
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.json() == {"serving": new, "swapped": True, "reason": ""}
        body = client.post("/classify", json={"text": "anything at all"}).json()
        assert body["model_version"] == new
        assert body["results"][0]["label"] == "legal-advice"
