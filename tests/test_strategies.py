"""Query strategies on synthetic pools whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from guardloop.trainer.simulation_results import class_count_std
from guardloop.trainer.strategies import STRATEGIES, entropy, make_strategy

from guardloop.core.datafiles import stratified_split

CENTERS = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [10.0, 10.0, 10.0]])


def blobs(per_blob: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four far-apart blobs; blob b holds a mix of confident and uncertain rows. Returns (emb, probs, blob_ids)."""
    rng = np.random.default_rng(seed)
    emb = np.concatenate([c + rng.normal(0, 0.3, size=(per_blob, 3)) for c in CENTERS])
    blob_ids = np.repeat(np.arange(len(CENTERS)), per_blob)
    sharpness = rng.uniform(0.5, 8.0, size=len(emb))
    logits = rng.normal(0, 1, size=(len(emb), 6)) * sharpness[:, None]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return emb, probs, blob_ids


def test_entropy_is_normalized():
    assert entropy(np.full((1, 6), 1 / 6))[0] == pytest.approx(1.0)
    assert entropy(np.array([[1.0, 0, 0, 0, 0, 0]]))[0] == pytest.approx(0.0, abs=1e-9)


def test_random_is_reproducible_and_distinct():
    emb, probs, _ = blobs()
    strategy = make_strategy("random")
    first = [s.index for s in strategy.select(emb, probs, 10, random_state=3)]
    again = [s.index for s in strategy.select(emb, probs, 10, random_state=3)]
    other = [s.index for s in strategy.select(emb, probs, 10, random_state=4)]
    assert first == again and first != other and len(set(first)) == 10


def test_topn_takes_the_most_uncertain():
    emb, probs, _ = blobs()
    picks = [s.index for s in make_strategy("topn").select(emb, probs, 5)]
    assert set(picks) == set(np.argsort(-entropy(probs))[:5].tolist())


def test_coreset_covers_every_blob():
    emb, probs, blob_ids = blobs()
    picks = [s.index for s in make_strategy("coreset").select(emb, probs, 4, random_state=1)]
    assert sorted(blob_ids[picks].tolist()) == [0, 1, 2, 3]


def test_coreset_starts_far_from_what_is_labeled():
    emb, probs, blob_ids = blobs()
    labeled = emb[blob_ids != 3][:60]  # blobs 0-2 already labeled
    picks = make_strategy("coreset").select(emb, probs, 1, labeled_embeddings=labeled)
    assert blob_ids[picks[0].index] == 3
    assert picks[0].reason["distance"] > 5


def test_cluster_takes_the_most_uncertain_item_of_each_cluster():
    emb, probs, blob_ids = blobs()
    picks = make_strategy("cluster").select(emb, probs, 4, random_state=0)
    assert sorted(blob_ids[[s.index for s in picks]].tolist()) == [0, 1, 2, 3]
    uncertainty = entropy(probs)
    for s in picks:
        members = np.flatnonzero(blob_ids == blob_ids[s.index])
        assert s.index == members[np.argmax(uncertainty[members])]
        assert s.reason["strategy"] == "cluster" and s.reason["cluster_size"] == 25
        assert s.reason["uncertainty"] == pytest.approx(uncertainty[s.index])


def test_cluster_with_fewer_clusters_than_budget_spreads_evenly():
    emb, probs, blob_ids = blobs()
    picks = make_strategy("cluster", n_clusters=4).select(emb, probs, 8, random_state=0)
    assert sorted(np.bincount(blob_ids[[s.index for s in picks]]).tolist()) == [2, 2, 2, 2]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_budget_larger_than_pool_returns_the_pool(name):
    emb, probs, _ = blobs(per_blob=2)
    picks = make_strategy(name).select(emb, probs, 50)
    assert sorted(s.index for s in picks) == list(range(8))


def test_bad_inputs():
    emb, probs, _ = blobs()
    with pytest.raises(ValueError, match="probability rows"):
        make_strategy("topn").select(emb[:3], probs, 2)
    with pytest.raises(ValueError, match="budget"):
        make_strategy("topn").select(emb, probs, 0)
    with pytest.raises(ValueError, match="choose one of"):
        make_strategy("bald")


def test_class_count_std_counts_missing_classes_as_zero():
    assert class_count_std({"self-harm": 6}) == pytest.approx(np.std([6, 0, 0, 0, 0, 0]))


def test_stratified_split_holds_out_each_class():
    from guardloop.core.datafiles import Example

    data = [Example(f"t{i}", "self-harm" if i % 3 else "legal-advice") for i in range(30)]
    kept, held = stratified_split(data, 0.3, seed=1)
    assert len(kept) + len(held) == 30 and not {e.text for e in kept} & {e.text for e in held}
    assert sum(e.label == "legal-advice" for e in held) == 3
    assert sum(e.label == "self-harm" for e in held) == 6
