"""Suspected mislabels: the label check catches a deliberately flipped label (real embeddings-shaped vectors, real
scikit-learn and cleanlab), and storage (SQLite and PostgreSQL) withholds a doubted label from training, puts its
item back in the queue for one other reviewer only, and lets that reviewer's answer settle it."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from guardloop.trainer.label_check import find_suspects

from guardloop.core.labels import LABELS
from guardloop.storage import (
    UNCERTAIN,
    Database,
    ItemComplete,
    LabelRequest,
    PoolRecord,
    PoolRepository,
    ReviewRepository,
)
from guardloop.storage.suspects import SuspectRepository, Suspicion


def clustered(labels: list[str], rng: np.random.Generator) -> np.ndarray:
    """One tight cluster per class (unit vectors around a class centre), like sentence embeddings of a clean set."""
    centres = {label: rng.normal(size=16) * 3 for label in LABELS}
    return np.stack([centres[label] + rng.normal(size=16) * 0.5 for label in labels])


def test_a_flipped_label_is_caught_and_only_single_reviewer_labels_are_flagged() -> None:
    rng = np.random.default_rng(0)
    base_labels = [label for label in LABELS for _ in range(20)]
    reviewed_true = [label for label in LABELS for _ in range(5)]
    vectors = clustered(base_labels + reviewed_true, rng)
    reviewed = list(reviewed_true)
    reviewed[3] = "legal-advice"  # a self-harm text labeled legal-advice
    reviewed[8] = "emergency-situation"  # flipped too, but a second person already looked at it
    eligible = [i != 8 for i in range(len(reviewed))]
    result = find_suspects(
        vectors[: len(base_labels)], base_labels, vectors[len(base_labels) :], reviewed, eligible, random_state=1
    )
    assert [s.index for s in result.suspects] == [3]
    (suspect,) = result.suspects
    assert (suspect.given, suspect.suggested) == ("legal-advice", reviewed_true[3])
    assert suspect.quality < 0.5
    assert result.checked == len(reviewed) - 1


def test_too_little_data_skips_the_check_with_a_reason() -> None:
    vectors = np.eye(3)
    result = find_suspects(
        vectors[:2], ["self-harm", "legal-advice"], vectors[2:], ["self-harm"], [True], random_state=0
    )
    assert result.suspects == [] and "fewer than 2" in (result.skipped or "")


def requested_items(database: Database, count: int) -> list[int]:
    pool = PoolRepository(database)
    now = datetime.now(UTC)
    pool.write_batch(
        [
            PoolRecord(
                text=f"text {n}",
                label="medical-advice",
                scores=dict.fromkeys(LABELS, 0.1) | {"medical-advice": 0.5},
                uncertainty=0.9,
                margin=0.4,
                model_version="v1",
                sampled_by=UNCERTAIN,
                client_id="bot",
                seen_at=now,
            )
            for n in range(count)
        ]
    )
    ids = sorted(item.id for item in pool.iter_items())
    pool.mark_requested([LabelRequest(item_id, {"cycle_id": "c1"}, 0.5) for item_id in ids], at=now)
    return ids


def test_a_suspected_label_is_withheld_requeued_for_another_reviewer_and_settled_by_them(database_url: str) -> None:
    database = Database(database_url)
    database.ensure_schema()
    try:
        first, other = requested_items(database, 2)
        reviews = ReviewRepository(database)
        reviews.add_label(first, "ann", "legal-advice")  # the deliberately wrong label
        reviews.add_label(other, "ann", "medical-advice")
        assert {f.item_id: f.checked for f in reviews.final_labels()} == {first: False, other: False}
        suspects = SuspectRepository(database)

        assert (
            suspects.mark([Suspicion(first, "legal-advice", "self-harm", 0.05)], cycle_id="c1", at=datetime.now(UTC))
            == 1
        )
        assert (
            suspects.mark([Suspicion(first, "legal-advice", "self-harm", 0.05)], cycle_id="c2", at=datetime.now(UTC))
            == 0
        )
        assert suspects.suspicion(first) == {
            "given": "legal-advice",
            "suggested": "self-harm",
            "quality": 0.05,
            "cycle_id": "c1",
        }
        # withheld from training, waiting for a second reviewer: not ann (she answered), anyone else, first in line
        assert [f.item_id for f in reviews.final_labels()] == [other]
        assert suspects.waiting() == 1
        assert reviews.queue("ann") == []
        assert [item.id for item in reviews.queue("bob", limit=5)] == [first]
        assert reviews.waiting()[0] == 1

        reviews.add_label(first, "bob", "self-harm")
        with pytest.raises(ItemComplete):
            reviews.add_label(first, "carol", "legal-advice")
        settled = {f.item_id: f for f in reviews.final_labels()}
        assert settled[first].label == "self-harm" and settled[first].reviewers == ["ann", "bob"]
        assert settled[first].checked
        assert suspects.waiting() == 0 and reviews.queue("carol") == []

        reviews.undo_last("bob")  # the second look retracted: withheld and queued again
        assert first not in {f.item_id for f in reviews.final_labels()}
        assert [item.id for item in reviews.queue("carol")] == [first]
    finally:
        database.dispose()
