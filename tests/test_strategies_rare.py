"""`rare-cluster` and the small-text adapters on synthetic pools with a known rare class.

The pool imitates what the paper's data does to `cluster`: a large, heterogeneous not-harmful class the model is
unsure about everywhere, four confident common classes, and 2% emergencies hidden among the not-harmful posts that
the model under-predicts (p(emergency) about 0.3, predicted not-harmful).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from guardloop.trainer.simulation_results import class_count_std
from guardloop.trainer.strategies import RareAwareCluster, entropy, make_strategy

from guardloop.core.labels import LABELS, SAFE_LABEL

RARE = LABELS.index("emergency-situation")
SAFE = LABELS.index(SAFE_LABEL)
COMMON = [c for c in range(len(LABELS)) if c not in (RARE, SAFE)]


def skewed_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, probabilities, true class) of 1,000 items in 6 Gaussian blobs, 20 of them (2%) the rare class."""
    rng = np.random.default_rng(seed)
    sizes = {SAFE: 500, RARE: 20} | {c: 120 for c in COMMON}
    truth = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    centers = rng.normal(0, 10, size=(6, 16))
    # Common classes: a blob each; not-harmful spread over two blobs; the emergencies inside the first of those.
    blob = np.array([COMMON.index(c) if c in COMMON else 4 + (c == SAFE and rng.random() < 0.5) for c in truth])
    emb = centers[blob] + rng.normal(0, 2, size=(len(truth), 16))
    logits = rng.normal(0, 1, size=(len(truth), len(LABELS)))
    logits[np.arange(len(truth)), truth] += np.where(truth == SAFE, 1.0, 3.5)  # not-harmful: unsure
    logits[:, RARE] -= 1.5  # the model seldom predicts the rare class
    rare = truth == RARE
    logits[rare] = rng.normal(0, 0.3, size=(rare.sum(), len(LABELS)))
    logits[rare, SAFE] += 2.0  # the model calls the emergencies not-harmful ...
    logits[rare, RARE] += 1.6  # ... with about 0.3 on emergency
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return emb, probs, truth


# A seed set labeled from the same skewed traffic: 2 emergencies among 100 labels.
SEED_LABELS = ["not-harmful"] * 50 + [LABELS[c] for c in COMMON for _ in range(12)] + ["emergency-situation"] * 2


def acquired(name: str | RareAwareCluster, budget: int, states=range(5), **kwargs) -> list[np.ndarray]:
    """True-class counts of the picks, one array per random_state."""
    emb, probs, truth = skewed_pool()
    strategy = make_strategy(name) if isinstance(name, str) else name
    kwargs.setdefault("labeled_labels", SEED_LABELS)
    return [
        np.bincount(
            truth[[s.index for s in strategy.select(emb, probs, budget, random_state=r, **kwargs)]], minlength=6
        )
        for r in states
    ]


def test_the_pool_hides_its_rare_class_from_the_model():
    _, probs, truth = skewed_pool()
    assert (truth == RARE).sum() == 20
    assert (probs.argmax(axis=1) == RARE).sum() < 5  # under-predicted
    assert 0.2 < probs[truth == RARE, RARE].mean() < 0.4


def test_acquires_the_rare_class_far_more_often_than_random_and_cluster():
    rare = {name: sum(c[RARE] for c in acquired(name, 20)) for name in ("random", "cluster", "rare-cluster")}
    assert rare["rare-cluster"] >= 10  # of 5 x 20 picks, where the pool holds 2%
    assert rare["rare-cluster"] >= 2 * max(rare["random"], rare["cluster"], 1)


def test_an_emergency_the_model_calls_not_harmful_can_fill_an_emergency_slot():
    emb, probs, truth = skewed_pool()
    picks = make_strategy("rare-cluster").select(emb, probs, 20, labeled_labels=SEED_LABELS)
    door = [
        s for s in picks if s.reason["quota_class"] == "emergency-situation" and s.reason["predicted"] == SAFE_LABEL
    ]
    assert len(door) >= 2 and all(0.2 <= s.reason["p_class"] < 0.5 for s in door)
    assert sum(truth[s.index] == RARE for s in door) >= 2


def test_acquired_classes_are_more_balanced_than_clusters():
    std = {
        name: np.mean([class_count_std(dict(zip(LABELS, c, strict=True))) for c in acquired(name, 30)])
        for name in ("cluster", "rare-cluster")
    }
    assert std["rare-cluster"] < std["cluster"]


def test_labeled_counts_shift_picks_toward_a_missing_class():
    """The quota part alone (class_share 1): the default gives half the budget to uncertainty, which dilutes it."""
    quotas_only = RareAwareCluster(class_share=1.0)
    medical, legal = LABELS.index("medical-advice"), LABELS.index("legal-advice")
    labeled_without_medical = ["legal-advice"] * 40 + ["not-harmful"] * 40 + ["emergency-situation"] * 40
    labeled_without_legal = ["medical-advice"] * 40 + ["not-harmful"] * 40 + ["emergency-situation"] * 40
    no_medical = sum(acquired(quotas_only, 20, labeled_labels=labeled_without_medical))
    no_legal = sum(acquired(quotas_only, 20, labeled_labels=labeled_without_legal))
    assert no_medical[medical] > 1.5 * no_legal[medical]
    assert no_legal[legal] > 1.5 * no_medical[legal]
    assert no_medical[RARE] < sum(acquired(quotas_only, 20))[RARE]  # emergencies well represented: fewer slots
    emb, probs, _ = skewed_pool()
    picks = quotas_only.select(emb, probs, 20, labeled_labels=labeled_without_medical)
    slots = {label: sum(s.reason["quota_class"] == label for s in picks) for label in LABELS}
    assert slots["medical-advice"] >= 3 and slots["medical-advice"] > 3 * slots["legal-advice"]


def test_the_dominant_predicted_class_is_capped():
    emb, probs, _ = skewed_pool()
    budget = 24
    picks = make_strategy("rare-cluster").select(emb, probs, budget, labeled_labels=["legal-advice"] * 50)
    assert sum(s.reason["quota_class"] == SAFE_LABEL for s in picks) <= math.ceil(budget / len(LABELS))


def test_deterministic_per_random_state_with_reasons():
    emb, probs, _ = skewed_pool()
    strategy = make_strategy("rare-cluster")
    first = strategy.select(emb, probs, 20, labeled_labels=["not-harmful"] * 10, random_state=7)
    again = strategy.select(emb, probs, 20, labeled_labels=["not-harmful"] * 10, random_state=7)
    assert [s.index for s in first] == [s.index for s in again]
    assert len({s.index for s in first}) == 20
    uncertainty = entropy(probs)
    by_slot = [s.reason["slot"] for s in first]
    assert by_slot == ["quota"] * 10 + ["uncertainty"] * 10  # class_share 0.5: quotas first, then uncertainty
    for s in first[10:]:
        assert s.reason["quota_class"] is None and s.reason["uncertainty"] == pytest.approx(uncertainty[s.index])
    first = first[:10]
    for s in first:
        reason = s.reason
        assert reason["strategy"] == "rare-cluster" and reason["slot"] == "quota"
        assert reason["predicted"] == LABELS[probs[s.index].argmax()]
        c = LABELS.index(reason["quota_class"])
        assert reason["p_class"] == pytest.approx(probs[s.index, c])
        assert reason["p_class"] >= 0.2 or reason["predicted"] == reason["quota_class"]
        assert reason["uncertainty"] == pytest.approx(uncertainty[s.index])
        assert 0 <= reason["cluster"] < 20
    quotas = {s.reason["quota_class"]: s.reason["quota"] for s in first}
    assert sum(quotas.values()) == 10 and quotas.get("not-harmful", 0) < quotas["emergency-situation"]


def test_picks_spread_over_clusters_before_repeating_one():
    emb, probs, _ = skewed_pool()
    picks = RareAwareCluster(n_clusters=8).select(emb, probs, 16, random_state=0)
    assert sorted(np.bincount([s.reason["cluster"] for s in picks], minlength=8).tolist()) == [2] * 8


def test_budget_beyond_the_candidates_falls_back_to_the_whole_pool():
    emb, probs, _ = skewed_pool()
    small = np.r_[0:3, 500:503]  # three not-harmful and three self-harm items
    picks = make_strategy("rare-cluster").select(emb[small], probs[small], 50)
    assert sorted(s.index for s in picks) == list(range(6))


def test_make_strategy_passes_n_clusters():
    assert make_strategy("rare-cluster", n_clusters=7).n_clusters == 7


def test_unknown_labeled_label_is_named():
    emb, probs, _ = skewed_pool()
    with pytest.raises(ValueError, match="'spam' is not one of"):
        make_strategy("rare-cluster").select(emb, probs, 5, labeled_labels=["spam"])


def test_small_text_breaking_ties_takes_the_smallest_margins():
    emb, probs, _ = skewed_pool()
    picks = make_strategy("small-text-breaking-ties").select(emb, probs, 15)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert sorted(s.index for s in picks) == sorted(np.argsort(margin)[:15].tolist())
    assert [s.reason["margin"] for s in picks] == sorted(s.reason["margin"] for s in picks)


def test_small_text_kmeans_returns_distinct_rows_reproducibly():
    emb, probs, _ = skewed_pool()
    strategy = make_strategy("small-text-kmeans")
    first = [s.index for s in strategy.select(emb, probs, 12, random_state=3)]
    again = [s.index for s in strategy.select(emb, probs, 12, random_state=3)]
    assert first == again and len(set(first)) == 12 and all(0 <= i < len(emb) for i in first)
