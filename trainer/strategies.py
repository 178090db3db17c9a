"""Query strategies: which pool items reviewers should label next.

In the spirit of small-text: small interchangeable classes behind one interface, each given the pool's
embeddings and the current model's probabilities, each returning `budget` indices with the reason it
picked them. `cluster` is the method of Hassan et al. (2024): k-means into K clusters, then the most
uncertain items of each, so acquisitions spread over the pool's topics (and its rare classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances


def entropy(probs: np.ndarray) -> np.ndarray:
    """Normalized entropy per row: 0 = certain, 1 = uniform."""
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1) / np.log(probs.shape[1])


@dataclass(frozen=True)
class Selection:
    index: int  # row in the pool arrays
    reason: dict[str, Any] = field(default_factory=dict)


class QueryStrategy(Protocol):
    name: ClassVar[str]

    def select(
        self,
        embeddings: np.ndarray,
        probs: np.ndarray,
        budget: int,
        *,
        labeled_embeddings: np.ndarray | None = None,
        random_state: int = 0,
    ) -> list[Selection]: ...


def _check(embeddings: np.ndarray, probs: np.ndarray, budget: int) -> int:
    if len(embeddings) != len(probs):
        raise ValueError(f"{len(embeddings)} embeddings but {len(probs)} probability rows")
    if budget < 1:
        raise ValueError("budget must be at least 1")
    return min(budget, len(probs))


class RandomSampling:
    name: ClassVar[str] = "random"

    def select(self, embeddings, probs, budget, *, labeled_embeddings=None, random_state=0):
        budget = _check(embeddings, probs, budget)
        picks = np.random.default_rng(random_state).choice(len(probs), size=budget, replace=False)
        uncertainty = entropy(probs)
        return [Selection(int(i), {"strategy": self.name, "uncertainty": float(uncertainty[i])}) for i in picks]


class TopNEntropy:
    name: ClassVar[str] = "topn"

    def select(self, embeddings, probs, budget, *, labeled_embeddings=None, random_state=0):
        budget = _check(embeddings, probs, budget)
        uncertainty = entropy(probs)
        picks = np.argsort(-uncertainty, kind="stable")[:budget]
        return [Selection(int(i), {"strategy": self.name, "uncertainty": float(uncertainty[i])}) for i in picks]


class CoreSet:
    """Greedy k-center (Sener & Savarese, 2018): each pick is the item farthest from everything chosen or labeled."""

    name: ClassVar[str] = "coreset"

    def select(self, embeddings, probs, budget, *, labeled_embeddings=None, random_state=0):
        budget = _check(embeddings, probs, budget)
        uncertainty = entropy(probs)
        if labeled_embeddings is not None and len(labeled_embeddings):
            nearest = pairwise_distances(embeddings, labeled_embeddings).min(axis=1)
            picks: list[tuple[int, float]] = []
        else:
            first = int(np.random.default_rng(random_state).integers(len(embeddings)))
            picks = [(first, float("inf"))]
            nearest = pairwise_distances(embeddings, embeddings[first : first + 1]).ravel()
        while len(picks) < budget:
            nxt = int(np.argmax(nearest))
            picks.append((nxt, float(nearest[nxt])))
            nearest = np.minimum(nearest, pairwise_distances(embeddings, embeddings[nxt : nxt + 1]).ravel())
        return [
            Selection(i, {"strategy": self.name, "uncertainty": float(uncertainty[i]), "distance": distance})
            for i, distance in picks
        ]


@dataclass
class ClusterEntropy:
    """k-means into `n_clusters` (default: the budget), then the most uncertain items of each cluster."""

    n_clusters: int | None = None
    name: ClassVar[str] = "cluster"

    def select(self, embeddings, probs, budget, *, labeled_embeddings=None, random_state=0):
        budget = _check(embeddings, probs, budget)
        k = min(self.n_clusters or budget, len(probs))
        clusters = KMeans(n_clusters=k, n_init=4, random_state=random_state).fit_predict(embeddings)
        uncertainty = entropy(probs)
        # Rank inside each cluster by uncertainty, then take rank 0 of every cluster, rank 1 of every cluster, ...
        # so the budget spreads over clusters before any cluster gives a second item.
        ranked: dict[int, list[int]] = {
            c: sorted(np.flatnonzero(clusters == c).tolist(), key=lambda i: -uncertainty[i]) for c in range(k)
        }
        picks: list[Selection] = []
        depth = 0
        while len(picks) < budget:
            layer = [(c, members[depth]) for c, members in ranked.items() if depth < len(members)]
            layer.sort(key=lambda item: -uncertainty[item[1]])
            for c, i in layer[: budget - len(picks)]:
                picks.append(
                    Selection(
                        int(i),
                        {
                            "strategy": self.name,
                            "cluster": int(c),
                            "cluster_size": len(ranked[c]),
                            "uncertainty": float(uncertainty[i]),
                        },
                    )
                )
            depth += 1
        return picks


STRATEGIES: dict[str, type] = {s.name: s for s in (RandomSampling, TopNEntropy, CoreSet, ClusterEntropy)}


def make_strategy(name: str, *, n_clusters: int | None = None) -> QueryStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return ClusterEntropy(n_clusters) if name == "cluster" else STRATEGIES[name]()
