"""Reviewer agreement: Krippendorff's published example gives its published alpha, through the math, the API (on
SQLite and PostgreSQL) and the CLI; a deterministic share of items goes to one second reviewer, never back to the
first, and the first label keeps deciding the item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.service.service_metrics import read_database_gauges
from prometheus_client import REGISTRY

from guardloop.core import telemetry
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import (
    Database,
    ItemComplete,
    ReviewerRepository,
    ReviewRepository,
)
from guardloop.storage.agreement import cohen_kappa, compute_agreement, nominal_alpha
from guardloop.storage.review import second_opinion_wanted
from tests.pool_items import seed_requested
from tests.tiny_onnx import publish_tiny

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers, 12 units, values 1-5
# (None: not coded). Published nominal alpha: 0.743. Value v stands for LABELS[v - 1] here.
_ = None
EXAMPLE_C = {
    "ann": [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    "bob": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    "carol": [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    "dave": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
}
# ann / bob share units 1-9 and differ on unit 6 only. Hand-computed:
# alpha: 18 values (label counts 5, 7, 4, 2), 2 disagreeing ordered pairs: 1 - 17 * 2 / (18^2 - 94) = 1 - 34/230.
# kappa: p_o = 8/9; ann's marginals 3,3,2,1 and bob's 2,4,2,1 over 9 give p_e = 23/81: (72 - 23) / (81 - 23) = 49/58.
ANN_BOB_ALPHA = 1 - 34 / 230
ANN_BOB_KAPPA = 49 / 58


def example_labels() -> dict[int, dict[str, str]]:
    """item number (1-12) -> reviewer -> label"""
    labels: dict[int, dict[str, str]] = {}
    for reviewer, values in EXAMPLE_C.items():
        for unit, value in enumerate(values, start=1):
            if value is not None:
                labels.setdefault(unit, {})[reviewer] = LABELS[value - 1]
    return labels


def check_example(agreement: dict) -> None:
    """The numbers of example C, however they were obtained (as_json shape)."""
    assert (agreement["items"], agreement["labels"]) == (11, 40)  # unit 12 has a single value: not pairable
    assert round(agreement["alpha"], 3) == 0.743
    assert agreement["alpha"] == pytest.approx(0.743421052631579)
    # emergency-situation (value 5) only on unit 10, where all three coders gave it: perfect; not-harmful never used
    assert agreement["by_class"]["emergency-situation"] == pytest.approx(1.0)
    assert agreement["by_class"]["not-harmful"] is None
    pairs = {tuple(pair["reviewers"]): pair for pair in agreement["pairs"]}
    assert sorted(pairs) == [
        ("ann", "bob"),
        ("ann", "carol"),
        ("ann", "dave"),
        ("bob", "carol"),
        ("bob", "dave"),
        ("carol", "dave"),
    ]
    assert pairs["ann", "bob"]["items"] == 9 and pairs["carol", "dave"]["items"] == 10
    assert pairs["ann", "bob"]["alpha"] == pytest.approx(ANN_BOB_ALPHA)
    assert pairs["ann", "bob"]["cohen_kappa"] == pytest.approx(ANN_BOB_KAPPA)


# ------------------------------------------------------------------ the math
def test_published_example_gives_published_alpha() -> None:
    check_example(compute_agreement(example_labels()).as_json())


def test_undefined_agreement_is_none() -> None:
    assert nominal_alpha([["self-harm", "legal-advice"]]) is None  # a single item
    assert nominal_alpha([["self-harm", "self-harm"], ["self-harm", "self-harm"]]) is None  # no variation
    assert cohen_kappa(["self-harm"], ["legal-advice"]) is None
    assert cohen_kappa(["self-harm", "self-harm"], ["self-harm", "self-harm"]) is None
    only_single = compute_agreement({1: {"ann": "self-harm"}, 2: {"bob": "legal-advice"}})
    assert (only_single.items, only_single.labels, only_single.alpha, only_single.pairs) == (0, 0, None, [])
    assert set(only_single.by_class.values()) == {None}
    # perfect agreement with variation is 1, systematic disagreement below 0
    assert nominal_alpha([["self-harm", "self-harm"], ["legal-advice", "legal-advice"]]) == pytest.approx(1.0)
    assert cohen_kappa(["self-harm", "legal-advice"], ["legal-advice", "self-harm"]) == pytest.approx(-1.0)


# ------------------------------------------------------------------ stored labels: API and CLI
@pytest.fixture
def example_db(database_url: str) -> Iterator[tuple[str, Database, dict[str, str]]]:
    """Example C stored as live review labels (plus a skip and a retracted label, which must not count)."""
    database = Database(database_url)
    database.ensure_schema()
    tokens = {name: ReviewerRepository(database).add(name) for name in EXAMPLE_C}
    ids = seed_requested(database, [f"item {n}" for n in range(12)])
    reviews = ReviewRepository(database, labels_per_item=4)
    for unit, by_reviewer in example_labels().items():
        for reviewer, label in by_reviewer.items():
            reviews.add_label(ids[unit - 1], reviewer, label)
    reviews.add_label(ids[10], "ann", "skip")  # an answer, not a label
    reviews.add_label(ids[11], "ann", "emergency-situation")
    reviews.undo_last("ann")  # retracted: gone from the measurement
    yield database_url, database, tokens
    database.dispose()


def test_stats_endpoint_reports_example_agreement(example_db, settings, registry, tmp_path) -> None:
    url, _database, tokens = example_db
    publish_tiny(registry, tmp_path, seed=1)
    settings = Settings(**(settings.model_dump() | {"database_url": url, "review_labels_per_item": 4}))
    with TestClient(create_app(settings)) as client:
        response = client.get("/review/stats", headers={"Authorization": f"Bearer {tokens['carol']}"})
    assert response.status_code == 200, response.text
    check_example(response.json()["agreement"])
    assert response.json()["second_opinion_share"] == 0.0  # only meaningful with one label per item


def test_cli_prints_example_agreement(example_db, tmp_path: Path) -> None:
    url, _database, _tokens = example_db
    env = {**os.environ, "GUARDLOOP_DATABASE_URL": url, "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-m", "guardloop.cli", "reviewers", "agreement"]
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    check_example(json.loads(as_json.stdout))
    text = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "items with 2+ labels: 11 (40 labels)" in text.stdout
    assert "alpha (nominal): 0.743" in text.stdout
    assert "ann / bob: 9 items, alpha 0.852, kappa 0.845" in text.stdout
    assert "not-harmful            alpha -" in text.stdout


# ------------------------------------------------------------------ second opinions
def test_second_opinion_rule_takes_exactly_the_share() -> None:
    for share in (0.0, 0.1, 0.25, 1.0):
        assert sum(second_opinion_wanted(item_id, share) for item_id in range(1, 10_001)) == round(share * 10_000)


def test_second_opinion_goes_to_one_other_reviewer(database_url: str) -> None:
    database = Database(database_url)
    database.ensure_schema()
    ids = seed_requested(database, [f"item {n}" for n in range(40)])
    chosen = {item_id for item_id in ids if second_opinion_wanted(item_id, 0.25)}
    assert 0 < len(chosen) < len(ids)
    reviews = ReviewRepository(database, labels_per_item=1, second_opinion_share=0.25)
    assert len(reviews.queue("bob", limit=100)) == len(ids)
    for item_id in ids:
        reviews.add_label(item_id, "ann", "self-harm")
    # the first label settles every item at once; the chosen ones wait for one other reviewer, never ann again
    settled = {final.item_id: final for final in reviews.final_labels()}
    assert set(settled) == set(ids) and {final.label for final in settled.values()} == {"self-harm"}
    assert reviews.queue("ann", limit=100) == []
    assert {item.id for item in reviews.queue("bob", limit=100)} == chosen
    assert reviews.waiting()[0] == len(chosen)
    # the queue-depth gauge counts them too: the service reads it with the reviewers' settings
    telemetry.expose_service_metrics()
    read_database_gauges(database, reviews)
    assert REGISTRY.get_sample_value("guardloop_review_queue_depth") == len(chosen)
    assert {item.id for item in ReviewRepository(database).queue("bob", limit=100)} == set()  # share 0: none
    for item_id in chosen:
        reviews.add_label(item_id, "bob", "legal-advice")
    assert reviews.queue("carol", limit=100) == []  # two labels: done
    with pytest.raises(ItemComplete):
        reviews.add_label(min(chosen), "carol", "self-harm")
    # the second opinion measures; it neither changes the settled label nor opens an adjudication
    after = {final.item_id: final for final in reviews.final_labels()}
    assert {k: replace(f, checked=False) for k, f in after.items()} == settled
    assert {k for k, f in after.items() if f.checked} == chosen  # two people looked: the label check leaves them
    assert reviews.adjudication_queue() == []
    # ann stays the first reviewer through a correction made after bob's answer
    reviews.correct_label(min(chosen), "ann", "financial-advice")
    assert {final.item_id: final.label for final in reviews.final_labels()}[min(chosen)] == "financial-advice"
    agreement = compute_agreement({item_id: {"ann": "self-harm", "bob": "legal-advice"} for item_id in chosen})
    assert agreement.items == len(chosen)
    database.dispose()


def test_second_opinions_through_the_api(settings, registry, tmp_path, database_url) -> None:
    database = Database(database_url)
    database.ensure_schema()
    tokens = {name: ReviewerRepository(database).add(name) for name in ("ann", "bob", "carol")}
    ids = seed_requested(database, [f"item {n}" for n in range(12)])
    chosen = {item_id for item_id in ids if second_opinion_wanted(item_id, 0.5)}
    assert 0 < len(chosen) < len(ids)
    publish_tiny(registry, tmp_path, seed=1)
    settings = Settings(**(settings.model_dump() | {"database_url": database_url, "review_second_opinion_share": 0.5}))

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    with TestClient(create_app(settings)) as client:
        for item_id in ids:
            answer = client.post(f"/review/items/{item_id}/label", json={"label": "self-harm"}, headers=auth("ann"))
            assert answer.status_code == 201, answer.text
        queue = client.get("/review/queue", params={"limit": 100}, headers=auth("bob")).json()
        assert {item["id"] for item in queue["items"]} == chosen and queue["queue_length"] == len(chosen)
        assert client.get("/review/queue", headers=auth("ann")).json()["items"] == []
        for n, item_id in enumerate(sorted(chosen)):  # bob agrees on all but the first
            label = "legal-advice" if n == 0 else "self-harm"
            answer = client.post(f"/review/items/{item_id}/label", json={"label": label}, headers=auth("bob"))
            assert answer.status_code == 201, answer.text
        assert client.get("/review/queue", headers=auth("carol")).json()["items"] == []
        late = client.post(f"/review/items/{min(chosen)}/label", json={"label": "self-harm"}, headers=auth("carol"))
        assert late.status_code == 409 and "already has the 2 label(s)" in late.json()["detail"]
        stats = client.get("/review/stats", headers=auth("carol")).json()
    assert stats["completed"] == len(ids) and stats["second_opinion_share"] == 0.5
    ((pair),) = stats["agreement"]["pairs"]
    assert pair["reviewers"] == ["ann", "bob"] and pair["items"] == len(chosen)
    # ann always said self-harm: her marginals are constant, so kappa's p_e = p_o's chance share and kappa is 0
    assert pair["cohen_kappa"] == pytest.approx(0.0)
    assert stats["agreement"]["items"] == len(chosen)
    database.dispose()
