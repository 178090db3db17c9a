"""Suspected mislabels: the label check catches a deliberately flipped label (real embeddings-shaped vectors, real
scikit-learn and cleanlab), and storage (SQLite and PostgreSQL) withholds a doubted label from training, puts its
item back in the queue for one other reviewer only, and lets that reviewer's answer settle it."""

from __future__ import annotations

import hashlib
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
from tests.pool_items import seed_requested


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


def test_a_suspected_label_is_withheld_requeued_for_another_reviewer_and_settled_by_them(database_url: str) -> None:
    database = Database(database_url)
    database.ensure_schema()
    try:
        first, other = seed_requested(database, ["text 0", "text 1"], {"cycle_id": "c1"})
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


# ------------------------------------------------------------------ the cycle's step, against the database
class ClassEmbedder:
    """Synthetic sentence embeddings (a fake: the real MiniLM embedder needs a ~15 s ONNX export into the cache):
    a text "<label> ..." lies near its class's centre, so the check sees a clean, learnable set."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.centres = {label: rng.normal(size=16) * 3 for label in LABELS}

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            noise = np.random.default_rng(seed).normal(size=16) * 0.5
            rows.append(self.centres[text.split()[0]] + noise)
        return np.stack(rows) if rows else np.zeros((0, 16))


def test_the_cycle_check_requeues_a_flipped_label_and_trains_it_once_settled(
    database_url: str, tmp_path, monkeypatch
) -> None:
    from guardloop.models.registry import ModelRegistry
    from guardloop.trainer import cycle as cycle_module

    from guardloop.core.settings import Settings

    monkeypatch.setattr(cycle_module, "SentenceEmbedder", lambda cache_dir: ClassEmbedder())
    base = tmp_path / "base.tsv"
    base.write_text("text\tlabel\n" + "".join(f"{y} base {n}\t{y}\n" for y in LABELS for n in range(12)))
    settings = Settings(data_dir=tmp_path / "data", registry_dir=tmp_path / "registry", train_data=[base])
    database = Database(database_url)
    database.ensure_schema()
    try:
        pool = PoolRepository(database)
        now = datetime.now(UTC)
        texts = [f"{y} reviewed {n}" for y in LABELS for n in range(3)]
        pool.write_batch(
            [
                PoolRecord(t, "self-harm", dict.fromkeys(LABELS, 1 / 6), 0.9, 0.0, "v1", UNCERTAIN, "bot", now)
                for t in texts
            ]
        )
        ids = {item.text: item.id for item in pool.iter_items()}
        pool.mark_requested([LabelRequest(i, {"cycle_id": "c1"}, 0.5) for i in ids.values()], at=now)
        reviews = ReviewRepository(database)
        flipped = ids["emergency-situation reviewed 1"]
        for text, item_id in ids.items():
            reviews.add_label(item_id, "ann", "legal-advice" if item_id == flipped else text.split()[0])

        runner = cycle_module.CycleRunner(settings, database, ModelRegistry(settings.registry_dir))
        cycle = runner.cycles.create("c1", strategy="rare-cluster", budget=18, parent_version=None)
        detail = runner._check_labels(cycle, now)  # the "check labels" step, without the training around it

        assert detail == {"checked": 18, "suspected": 1, "withheld": 1}
        assert SuspectRepository(database).suspicion(flipped)["suggested"] == "emergency-situation"
        assert flipped not in {f.item_id for f in reviews.final_labels()}  # withheld from this training
        assert [item.id for item in reviews.queue("bob")] == [flipped]  # back in the queue, for someone else
        reviews.add_label(flipped, "bob", "emergency-situation")
        settled = {f.item_id: f.label for f in reviews.final_labels()}
        assert settled[flipped] == "emergency-situation" and len(settled) == 18  # trains next time
        # the next check leaves the label two people looked at alone
        assert runner._check_labels(cycle, now) == {"checked": 17, "suspected": 0, "withheld": 0}
    finally:
        database.dispose()
