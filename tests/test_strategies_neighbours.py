"""`rare-cluster` judges class membership on the model and on the labeled texts' neighbourhoods.

The pool here hides its rare class completely from the model (p(emergency) about 0.05, never near the 0.2 a quota
slot needs), as a model trained on five emergencies does: quotas by the model's probabilities alone cannot find
them, while the few labeled emergencies' neighbours in embedding space can.
"""

from __future__ import annotations

import numpy as np
import pytest
from guardloop.trainer.strategies import RareAwareCluster, entropy, make_strategy, neighbour_evidence

from guardloop.core.labels import LABELS, SAFE_LABEL

RARE = LABELS.index("emergency-situation")
SAFE = LABELS.index(SAFE_LABEL)


def blind_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pool embeddings, probabilities, true class, labeled embeddings, labels): 6 blobs, 30 rare items of 1,000,
    which the model calls not-harmful with p(emergency) about 0.05; 3 labeled emergencies among 100 labels."""
    rng = np.random.default_rng(seed)
    sizes = {SAFE: 470, RARE: 30} | {c: 125 for c in range(len(LABELS)) if c not in (SAFE, RARE)}
    truth = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    centers = rng.normal(0, 10, size=(len(LABELS), 16))
    emb = centers[truth] + rng.normal(0, 3, size=(len(truth), 16))
    logits = rng.normal(0, 1, size=(len(truth), len(LABELS)))
    logits[np.arange(len(truth)), truth] += np.where(truth == SAFE, 1.0, 3.0)
    rare = truth == RARE
    logits[rare] = rng.normal(0, 0.3, size=(rare.sum(), len(LABELS)))
    logits[rare, SAFE] += 2.5
    logits[~rare, RARE] -= 4.0  # nothing else looks like an emergency to the model ...
    logits[rare, RARE] -= 1.0  # ... and neither do the emergencies
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labeled_truth = np.array([SAFE] * 37 + [c for c in range(len(LABELS)) if c not in (SAFE, RARE) for _ in range(15)])
    labeled_truth = np.concatenate([labeled_truth, [RARE] * 3])
    labeled = centers[labeled_truth] + rng.normal(0, 3, size=(len(labeled_truth), 16))
    return emb, probs, truth, labeled, [LABELS[c] for c in labeled_truth]


def rare_picks(strategy: RareAwareCluster, *, with_neighbours: bool, budget: int = 20) -> int:
    emb, probs, truth, labeled, labels = blind_pool()
    picks = strategy.select(
        emb, probs, budget, labeled_embeddings=labeled if with_neighbours else None, labeled_labels=labels
    )
    return int((truth[[s.index for s in picks]] == RARE).sum())


def test_the_model_never_sees_the_rare_class():
    _, probs, truth, _, _ = blind_pool()
    assert (probs.argmax(axis=1) == RARE).sum() == 0
    assert probs[truth == RARE, RARE].max() < 0.2


def test_neighbours_find_the_rare_class_the_model_cannot():
    strategy = RareAwareCluster()
    blind, seeing = rare_picks(strategy, with_neighbours=False), rare_picks(strategy, with_neighbours=True)
    assert blind <= 1
    assert seeing >= 4  # of 20 picks, where 3% of the pool is rare
    picks = strategy.select(*blind_pool()[:2], 20, labeled_embeddings=blind_pool()[3], labeled_labels=blind_pool()[4])
    assert {s.reason["evidence"] for s in picks} == {"model+neighbours"}


def test_neighbour_weight_zero_is_the_model_alone():
    assert rare_picks(RareAwareCluster(neighbour_weight=0.0), with_neighbours=True) <= 1


def test_neighbour_evidence_is_balanced_over_class_sizes():
    """Two labeled texts close by outweigh fifty far away: each class scores by its own nearest few."""
    point = np.array([[1.0, 0.0]])
    labeled = np.array([[0.95, 0.3], [0.9, -0.4]] + [[0.2, 1.0]] * 50)
    labels = ["emergency-situation"] * 2 + ["not-harmful"] * 50
    evidence = neighbour_evidence(point, labeled, labels, LABELS)
    assert evidence[0].argmax() == RARE
    assert evidence[0].sum() == pytest.approx(1.0)
    assert evidence[0, LABELS.index("self-harm")] == 0.0  # no labeled text: no evidence


def test_a_rare_class_in_separate_places_is_judged_by_its_nearest_example():
    """Five labeled emergencies on five different topics (storm, first aid, ...): a pool text on one of those
    topics is an emergency by its nearest labeled text. The mean of a class's 3 nearest blurs the five into one
    region, and a common class whose many texts sit at a middling distance outvotes it (`neighbours` 1)."""
    directions = np.eye(8)
    rare_labeled = directions[:5]  # one emergency per topic
    common_labeled = np.tile(0.75 * directions[0] + 0.66 * directions[7], (40, 1))  # near topic 0, never on it
    labeled = np.concatenate([rare_labeled, common_labeled])
    labels = ["emergency-situation"] * 5 + ["not-harmful"] * 40
    on_topic_0 = directions[[0]]
    assert neighbour_evidence(on_topic_0, labeled, labels, LABELS, k=3)[0].argmax() == SAFE
    judged = neighbour_evidence(on_topic_0, labeled, labels, LABELS, k=RareAwareCluster().neighbours)
    assert judged[0].argmax() == RARE


def test_class_share_leaves_the_rest_to_uncertainty_over_clusters():
    emb, probs, _, labeled, labels = blind_pool()
    picks = RareAwareCluster(class_share=0.5).select(emb, probs, 20, labeled_embeddings=labeled, labeled_labels=labels)
    slots = [s.reason["slot"] for s in picks]
    assert len({s.index for s in picks}) == 20
    assert sum(slot in ("quota", "spare") for slot in slots) == 10
    assert slots.count("uncertainty") == 10


def test_labeled_embeddings_must_match_the_labels_row_for_row():
    emb, probs, _, labeled, labels = blind_pool()
    with pytest.raises(ValueError, match="labeled embeddings but"):
        make_strategy("rare-cluster").select(emb, probs, 5, labeled_embeddings=labeled[:-1], labeled_labels=labels)


def test_the_uncertainty_part_takes_the_dominant_class_only_up_to_its_share_of_the_pool():
    """Heterogeneous not-harmful posts (a quarter of this pool, spread over many topics) that the model is unsure
    about everywhere, and confident common classes: without a cap they fill the whole uncertainty half."""
    rng = np.random.default_rng(3)
    common = [c for c in range(len(LABELS)) if c != SAFE]
    truth = np.array([SAFE] * 250 + [c for c in common for _ in range(150)])
    centers = rng.normal(0, 10, size=(len(LABELS) + 25, 16))
    blob = np.where(truth == SAFE, len(LABELS) + rng.integers(0, 25, size=len(truth)), truth)
    emb = centers[blob] + rng.normal(0, 2, size=(len(truth), 16))
    logits = rng.normal(0, 0.3, size=(len(truth), len(LABELS)))
    logits[np.arange(len(truth)), truth] += np.where(truth == SAFE, 0.7, 4.0)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labeled_truth = np.array([c for c in common for _ in range(20)] + [SAFE] * 50)
    labeled_blob = np.where(labeled_truth == SAFE, len(LABELS) + np.arange(len(labeled_truth)) % 25, labeled_truth)
    labeled = centers[labeled_blob] + rng.normal(0, 2, size=(len(labeled_truth), 16))
    labels = [LABELS[c] for c in labeled_truth]
    assert (truth[np.argsort(-entropy(probs))[:100]] == SAFE).all()  # the 100 most uncertain: all not-harmful
    picks = RareAwareCluster().select(emb, probs, 20, labeled_embeddings=labeled, labeled_labels=labels)
    assert 1 <= sum(truth[s.index] == SAFE for s in picks) <= 6  # a quarter of the pool: about 5 of 20
    assert [s.reason["slot"] for s in picks].count("uncertainty") == 10
