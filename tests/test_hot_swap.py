"""Hot-swap: the service follows the registry, refuses broken versions, and never fails a request mid-swap."""

from __future__ import annotations

import json
import threading
import time

import httpx
from fastapi.testclient import TestClient
from guardloop.service.app import create_app

from tests.conftest import ADMIN_TOKEN, live_server, wait_for
from tests.tiny_onnx import publish_tiny

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def served_version(client: TestClient) -> str:
    return client.get("/models/current").json()["version"]


def test_service_follows_the_current_pointer_within_the_poll_interval(settings, registry, tmp_path):
    first = publish_tiny(registry, tmp_path, favour="self-harm")
    with TestClient(create_app(settings)) as client:
        assert served_version(client) == first
        second = publish_tiny(registry, tmp_path, favour="legal-advice")
        started = time.monotonic()
        assert wait_for(lambda: served_version(client) == second, timeout=5)
        assert time.monotonic() - started < 5 * settings.registry_poll_seconds + 1
        registry.rollback()
        assert wait_for(lambda: served_version(client) == first, timeout=5)
        assert client.post("/classify", json={"text": "x"}).json()["results"][0]["label"] == "self-harm"


def _assert_refused(client: TestClient, good: str, broken: str, fragment: str) -> None:
    time.sleep(0.6)  # several poll intervals: the poller must have seen and refused it
    assert served_version(client) == good
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert broken in detail and fragment in detail and f"still serving {good}" in detail
    assert client.post("/classify", json={"text": "still answering?"}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_truncated_model_file_is_refused_and_the_old_model_keeps_serving(settings, registry, tmp_path):
    good = publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_tiny(registry, tmp_path, make_current=False, seed=3)
        model_file = registry.path(broken) / "model.onnx"
        model_file.write_bytes(model_file.read_bytes()[:1000])
        registry.promote(broken)
        _assert_refused(client, good, broken, "cannot load")


def test_wrong_labels_are_refused(settings, registry, tmp_path):
    good = publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_tiny(registry, tmp_path, make_current=False, seed=4)
        labels = json.loads((registry.path(broken) / "labels.json").read_text())
        labels[0] = "spam"
        (registry.path(broken) / "labels.json").write_text(json.dumps(labels))
        registry.promote(broken)
        _assert_refused(client, good, broken, "labels")


def test_missing_tokenizer_is_refused(settings, registry, tmp_path):
    good = publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_tiny(registry, tmp_path, make_current=False, seed=5)
        (registry.path(broken) / "tokenizer.json").unlink()
        registry.promote(broken)
        _assert_refused(client, good, broken, "tokenizer.json")


def test_a_refused_version_can_be_fixed_and_reloaded(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_tiny(registry, tmp_path, make_current=False, favour="financial-advice", seed=6)
        tokenizer = registry.path(broken) / "tokenizer.json"
        saved = tokenizer.read_bytes()
        tokenizer.unlink()
        registry.promote(broken)
        time.sleep(0.5)
        tokenizer.write_bytes(saved)
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 200 and response.json()["serving"] == broken


def test_hot_swaps_under_concurrent_requests_fail_nothing(settings, registry, tmp_path):
    favour = {}
    for label in ("self-harm", "legal-advice"):
        favour[publish_tiny(registry, tmp_path, favour=label, make_current=False)] = label
    versions = list(favour)
    registry.promote(versions[0])
    fast = settings.model_copy(update={"registry_poll_seconds": 0.05})
    failures: list[str] = []
    mismatches: list[str] = []
    seen_versions: set[str] = set()
    done = threading.Event()
    counts = [0]

    with live_server(fast) as url:

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not done.is_set():
                    try:
                        response = http.post("/classify", json={"texts": ["one message", "and another one"]})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    body = response.json()
                    seen_versions.add(body["model_version"])
                    counts[0] += 1
                    for result in body["results"]:
                        if result["label"] != favour[body["model_version"]]:
                            mismatches.append(body["model_version"])

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for i in range(16):
            registry.promote(versions[i % 2])
            time.sleep(0.25)
        done.set()
        for thread in threads:
            thread.join(timeout=30)

    assert failures == []
    assert mismatches == []
    assert seen_versions == set(versions)
    assert counts[0] > 100
