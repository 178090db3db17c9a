"""Hot-swap: the service follows the registry, refuses broken versions, and never fails a request mid-swap."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app

from tests.conftest import ADMIN_TOKEN, live_server, wait_for
from tests.tiny_onnx import publish_dir, publish_tiny, write_broken_model

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def served_version(client: TestClient) -> str:
    return client.get("/models/current").json()["version"]


def test_service_follows_the_current_pointer_within_the_poll_interval(settings, registry, tmp_path):
    first = publish_tiny(registry, tmp_path, favour="self-harm")
    with TestClient(create_app(settings)) as client:
        assert served_version(client) == first
        second = publish_tiny(registry, tmp_path, favour="legal-advice")
        # Nothing but the poller loads it (no reload is sent); how soon depends on a busy machine's scheduler,
        # so the deadline is generous: a service that stopped polling never gets there.
        assert wait_for(lambda: served_version(client) == second, timeout=30)
        registry.rollback()
        assert wait_for(lambda: served_version(client) == first, timeout=30)
        assert client.post("/classify", json={"text": "x"}).json()["results"][0]["label"] == "self-harm"


def refused_by_the_poller(client: TestClient, version: str) -> bool:
    return version in client.app.state.holder.refused


def _assert_refused(client: TestClient, good: str, broken: str, fragment: str) -> None:
    # The poller tries the promoted version once and records why it refused it.
    assert wait_for(lambda: refused_by_the_poller(client, broken), timeout=30)
    assert fragment in client.app.state.holder.refused[broken]
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


@pytest.mark.parametrize(("fault", "fragment"), [("shape", "expected (batch, 6)"), ("nan", "unusable output")])
def test_a_model_whose_warm_up_fails_is_refused(settings, registry, tmp_path, fault, fragment):
    """The model loads (a valid graph, the right labels file) but scores badly: one output column too many, or
    NaN for every text. Only the warm-up run can tell; the old model keeps serving."""
    good = publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_dir(
            registry, write_broken_model(tmp_path / f"broken-{fault}", fault=fault), make_current=False
        )
        registry.promote(broken)
        _assert_refused(client, good, broken, fragment)
        assert "warm-up" in client.app.state.holder.refused[broken]


def test_a_refused_version_can_be_fixed_and_reloaded(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    with TestClient(create_app(settings)) as client:
        broken = publish_tiny(registry, tmp_path, make_current=False, favour="financial-advice", seed=6)
        tokenizer = registry.path(broken) / "tokenizer.json"
        saved = tokenizer.read_bytes()
        tokenizer.unlink()
        registry.promote(broken)
        assert wait_for(lambda: refused_by_the_poller(client, broken), timeout=30)
        tokenizer.write_bytes(saved)
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 200 and response.json()["serving"] == broken


def test_hot_swaps_under_concurrent_requests_fail_nothing(settings, registry, tmp_path):
    """Eight clients classify while the current pointer flips 16 times. Every answer must be a 200 whose body parses,
    carries both results, names one of the two versions and gives that version's verdict; a client thread that
    dies on anything unexpected is a failure too, not a warning."""
    favour = {}
    for label in ("self-harm", "legal-advice"):
        favour[publish_tiny(registry, tmp_path, favour=label, make_current=False)] = label
    versions = list(favour)
    registry.promote(versions[0])
    fast = settings.model_copy(update={"registry_poll_seconds": 0.05})
    failures: list[str] = []
    seen_versions: list[str] = []
    done = threading.Event()
    lock = threading.Lock()

    with live_server(fast) as url:

        def check(response: httpx.Response) -> str:
            if response.status_code != 200:
                return f"{response.status_code} {response.text[:200]}"
            body = response.json()  # a malformed body raises: recorded as a failure below
            version = body["model_version"]
            if version not in favour:
                return f"unknown version in {body}"
            labels = [result["label"] for result in body["results"]]
            if labels != [favour[version]] * 2:
                return f"{version} answered {labels}"
            with lock:
                seen_versions.append(version)
            return ""

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not done.is_set():
                    try:
                        problem = check(http.post("/classify", json={"texts": ["one message", "and another one"]}))
                    except Exception as exc:  # transport errors, bad JSON, missing keys: all failures
                        problem = repr(exc)
                    if problem:
                        with lock:
                            failures.append(problem)

        def latest() -> str | None:
            with lock:
                return seen_versions[-1] if seen_versions else None

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for i in range(16):
                target = versions[i % 2]
                registry.promote(target)
                # The next swap waits until the clients are answered by this version (no sleep as pacing).
                assert wait_for(lambda t=target: latest() == t or bool(failures), timeout=30), (i, target)
                assert failures == []
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=30)
    assert [thread for thread in threads if thread.is_alive()] == []
    assert failures == []
    assert set(seen_versions) == set(versions)
