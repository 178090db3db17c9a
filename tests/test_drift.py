"""Drift and label-free performance (trainer/drift.py, monitor.py, reference.py, scheduler.py): the MMD permutation
test separates shifted from unshifted samples; the confidence-based estimate matches labels drawn from calibrated
probabilities; a model's drift reference is published with it; and, on a real pool (SQLite and PostgreSQL), a
real registry with a tiny ONNX model and the real APScheduler, shifted traffic raises the drift score and starts a
cycle while unshifted traffic does not.

The sentence embeddings here are synthetic (TopicEmbedder): the real MiniLM embedder needs a ~15 s ONNX export
into each fresh cache, and what these tests check is the statistics and the wiring, not MiniLM.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.drift import estimate_performance, mmd_drift
from guardloop.trainer.monitor import MIN_RECENT_ITEMS, DriftMonitor
from guardloop.trainer.reference import REFERENCE_FILE, load_reference, write_reference
from guardloop.trainer.scheduler import build_scheduler
from prometheus_client import REGISTRY

from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import RANDOM_SAMPLE, UNCERTAIN, Database, PoolRecord, PoolRepository, upgrade_database
from tests.tiny_onnx import publish_dir, write_tiny_model

TOPICS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
TRAINED_ON = ("alpha", "bravo", "charlie", "delta")  # the model's training texts are about these
NEW_TOPICS = ("golf", "hotel")  # and shifted traffic is mostly about these


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


class TopicEmbedder:
    """A text's first word picks one of eight fixed directions; the whole text seeds the noise around it."""

    def __init__(self, width: int = 32) -> None:
        self.centres = unit(np.random.default_rng(0).normal(size=(len(TOPICS), width)))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            noise = np.random.default_rng(zlib.crc32(text.encode())).normal(size=self.centres.shape[1])
            rows.append(unit(3 * self.centres[TOPICS.index(text.split()[0])] + 0.45 * noise))
        return np.array(rows, dtype=np.float32).reshape(len(texts), self.centres.shape[1])


def texts_about(topics: Sequence[str], n: int, tag: str) -> list[str]:
    return [f"{topics[i % len(topics)]} {tag} text number {i}" for i in range(n)]


# --------------------------------------------------------------------------------------------- the statistics
def test_mmd_flags_a_shifted_sample_and_not_an_unshifted_one():
    embedder = TopicEmbedder()
    reference = embedder.embed(texts_about(TRAINED_ON, 400, "train"))
    unshifted = mmd_drift(reference, embedder.embed(texts_about(TRAINED_ON, 300, "later")), alpha=0.01)
    shifted = mmd_drift(
        reference, embedder.embed(texts_about(TRAINED_ON, 150, "later") + texts_about(NEW_TOPICS, 150, "new"))
    )
    assert not unshifted.drifted and unshifted.p_value > 0.01
    assert shifted.drifted and shifted.p_value <= 0.01
    assert shifted.score > 10 * max(unshifted.score, shifted.threshold / 10)
    assert (shifted.n_reference, shifted.n_recent) == (400, 300)


def test_mmd_false_alarm_rate_stays_near_alpha_on_same_distribution_samples():
    rng = np.random.default_rng(3)
    centres = unit(rng.normal(size=(5, 16)))

    def draw(n: int) -> np.ndarray:
        return unit(3 * centres[rng.integers(0, 5, n)] + rng.normal(size=(n, 16)))

    alarms = sum(mmd_drift(draw(100), draw(100), alpha=0.05, permutations=100, seed=s).drifted for s in range(20))
    assert alarms <= 4  # expected 1 at alpha 0.05; 5+ of 20 has probability 0.3%


def test_mmd_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd_drift(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="widths differ"):
        mmd_drift(np.zeros((5, 4)), np.zeros((5, 3)))


def test_confidence_based_estimate_matches_labels_drawn_from_the_probabilities():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(len(LABELS), 0.3), size=4000)
    truth = np.array([rng.choice(len(LABELS), p=row) for row in probs])  # calibrated by construction
    predicted = probs.argmax(axis=1)
    estimate = estimate_performance(probs)
    for k, label in enumerate(LABELS):
        true_positives = np.sum((predicted == k) & (truth == k))
        assert estimate["per_class"][label].precision == pytest.approx(
            true_positives / np.sum(predicted == k), abs=0.05
        )
        assert estimate["per_class"][label].recall == pytest.approx(true_positives / np.sum(truth == k), abs=0.05)
    assert estimate["accuracy"] == pytest.approx(np.mean(predicted == truth), abs=0.03)


def test_estimate_has_no_figure_for_a_class_never_predicted():
    probs = np.tile(np.array([0.0, 0.1, 0.1, 0.1, 0.1, 0.6]), (10, 1))
    estimate = estimate_performance(probs)
    assert estimate["per_class"]["self-harm"].precision is None and estimate["per_class"]["self-harm"].recall is None
    assert estimate["per_class"]["medical-advice"].precision is None  # predicted never, though it has mass
    assert estimate["per_class"]["not-harmful"].precision == pytest.approx(0.6)


# --------------------------------------------------------------------------------------------- the reference
def test_the_reference_is_published_with_the_model(registry: ModelRegistry, tmp_path: Path):
    staging = write_tiny_model(tmp_path / "staging")
    rows = write_reference(staging, texts_about(TRAINED_ON, 50, "train") * 2, TopicEmbedder(), rows=40)
    version = publish_dir(registry, staging)
    stored = load_reference(registry.path(version))
    assert rows == 40 and stored is not None and stored.shape == (40, 32)  # duplicates count once
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-2)  # float16 on disk
    bare = publish_dir(registry, write_tiny_model(tmp_path / "bare"))
    assert not (registry.path(bare) / REFERENCE_FILE).exists() and load_reference(registry.path(bare)) is None


# --------------------------------------------------------------------------------------------- monitor + schedule
def pool_record(text: str, at: datetime, sampled_by: str = RANDOM_SAMPLE) -> PoolRecord:
    scores = dict.fromkeys(LABELS, 1 / len(LABELS))
    return PoolRecord(text, LABELS[-1], scores, 0.9, 0.1, "v", sampled_by, None, at)


@pytest.fixture
def drift_setup(registry: ModelRegistry, tmp_path: Path, database_url: str):
    """A published tiny model whose reference is about TRAINED_ON, an empty pool, and settings to check with."""
    embedder = TopicEmbedder()
    staging = write_tiny_model(tmp_path / "staging")
    write_reference(staging, texts_about(TRAINED_ON, 300, "train"), embedder)
    publish_dir(registry, staging)
    database = Database(database_url)
    upgrade_database(database)
    settings = Settings(
        registry_dir=registry.root,
        data_dir=tmp_path / "data",
        database_url=database_url,
        cycle_interval_minutes=600,
        drift_check_minutes=600,
        pool_map_items=0,
    )
    monitor = DriftMonitor(settings, database, registry, embedder=lambda: embedder)
    return settings, database, monitor


def fill_pool(database: Database, texts: Sequence[str]) -> None:
    now = datetime.now(UTC)
    records = [pool_record(text, now - timedelta(seconds=i)) for i, text in enumerate(texts)]
    # Uncertain items about the new topics too: the check must leave them out (they are not a sample of traffic).
    records += [pool_record(f"{NEW_TOPICS[0]} unsure {i}", now, UNCERTAIN) for i in range(100)]
    PoolRepository(database).write_batch(records)


def run_schedule(settings: Settings, monitor: DriftMonitor) -> bool:
    """The real scheduler with the monitor's check: True when it started the cycle job."""
    checked, cycle_started = threading.Event(), threading.Event()

    def check() -> bool:
        try:
            return monitor.check().start_cycle
        finally:
            checked.set()

    scheduler = build_scheduler(settings, cycle_started.set, blocking=False, check_drift=check)
    scheduler.start()
    try:
        assert checked.wait(20), "the drift check did not run at start"
        # A drifted check moves the cycle job to now: it starts within milliseconds. A second is ample to see that a
        # stable check did not.
        return cycle_started.wait(1.0)
    finally:
        scheduler.shutdown(wait=False)


@pytest.mark.parametrize("shifted", [True, False], ids=["shifted", "unshifted"])
def test_shifted_traffic_raises_the_drift_score_and_starts_a_cycle(drift_setup, shifted: bool):
    settings, database, monitor = drift_setup
    recent = texts_about(TRAINED_ON, 60, "later")
    if shifted:
        recent = texts_about(TRAINED_ON, 20, "later") + texts_about(NEW_TOPICS, 60, "new")
    fill_pool(database, recent)

    assert run_schedule(settings, monitor) is shifted
    score = REGISTRY.get_sample_value("guardloop_drift_score")
    threshold = REGISTRY.get_sample_value("guardloop_drift_threshold")
    assert (score > threshold) is shifted
    assert REGISTRY.get_sample_value("guardloop_drift_recent_items") == len(recent)  # the random sample only
    estimated = [REGISTRY.get_sample_value("guardloop_estimated_precision", {"label": label}) for label in LABELS]
    assert any(value is not None and 0 <= value <= 1 for value in estimated)
    if shifted:  # once per served version: the next check reports drift again but starts no second cycle
        again = monitor.check()
        assert again.outcome == "drifted" and not again.start_cycle


def test_too_few_sampled_items_skip_the_check(drift_setup):
    _, database, monitor = drift_setup
    fill_pool(database, texts_about(NEW_TOPICS, MIN_RECENT_ITEMS - 1, "new"))
    before = REGISTRY.get_sample_value("guardloop_drift_checks_total", {"outcome": "skipped"}) or 0
    report = monitor.check()
    assert report.outcome == "skipped" and "need 30" in report.reason and not report.start_cycle
    assert REGISTRY.get_sample_value("guardloop_drift_checks_total", {"outcome": "skipped"}) == before + 1
