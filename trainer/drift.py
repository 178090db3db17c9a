"""Has traffic moved away from what the model learned, and how well is it likely doing there, without labels?

Drift: a kernel two-sample test (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012) between the sentence
embeddings of the model's training texts (the reference stored with the model, see `reference.py`) and those of
recent traffic. The statistic is the unbiased MMD^2 with an RBF kernel whose bandwidth is the median pairwise
squared distance of the pooled sample; the threshold is the (1 - alpha) quantile of the statistic over random
relabellings of the pooled sample (a permutation test), so "drifted" has a false-alarm rate of alpha when
traffic is drawn from the training distribution, whatever the embedding's geometry.

Label-free performance: confidence-based performance estimation (CBPE; NannyML's name for it). If the model's
probabilities are calibrated, p_ik is the chance that text i truly is class k, so over texts predicted k the
expected true positives are sum p_ik, and the expected support of k over all texts is sum_i p_ik. Expected
precision and recall follow without a single label. The estimate is only as good as the calibration: an
overconfident model's estimate is optimistic, so it is a trend to watch against the recall measured at evaluation,
not a replacement for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardloop.core.labels import LABELS


@dataclass(frozen=True)
class DriftResult:
    score: float  # unbiased MMD^2 of recent traffic against the reference
    threshold: float  # the (1 - alpha) quantile of the score under permutation (traffic = training data)
    p_value: float
    n_reference: int
    n_recent: int

    @property
    def drifted(self) -> bool:
        return self.score > self.threshold

    def as_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "p_value": self.p_value,
            "drifted": self.drifted,
            "n_reference": self.n_reference,
            "n_recent": self.n_recent,
        }


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=limit, replace=False))]


def rbf_kernel_matrix(points: np.ndarray) -> np.ndarray:
    """exp(-|a-b|^2 / median |a-b|^2) over all pairs (the median heuristic: no bandwidth to tune)."""
    points = points.astype(np.float64)
    norms = (points * points).sum(axis=1)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * points @ points.T, 0.0)
    off_diagonal = squared[~np.eye(len(points), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) if off_diagonal.size else 1.0
    return np.exp(-squared / (bandwidth if bandwidth > 0 else 1.0))


def _mmd2_unbiased(kernel: np.ndarray, first: np.ndarray) -> np.ndarray:
    """MMD^2_u for each column of `first` (n x P booleans: which rows form the first sample), all at once:
    with indicator vectors s, the within and between sums are s'Ks, (1-s)'K(1-s) and s'K(1-s)."""
    n = kernel.shape[0]
    diagonal = np.diag(kernel).copy()
    s = first.astype(np.float64)
    t = 1.0 - s
    ks = kernel @ s
    m = s.sum(axis=0)
    k = n - m
    within_first = (s * ks).sum(axis=0) - s.T @ diagonal
    within_second = (t * (kernel @ t)).sum(axis=0) - t.T @ diagonal
    between = (t * ks).sum(axis=0)
    return within_first / (m * (m - 1)) + within_second / (k * (k - 1)) - 2.0 * between / (m * k)


def mmd_drift(
    reference: np.ndarray,
    recent: np.ndarray,
    *,
    permutations: int = 200,
    alpha: float = 0.01,
    max_per_side: int = 500,
    seed: int = 0,
) -> DriftResult:
    """MMD^2 permutation test of `recent` against `reference` (rows: embeddings). Each side is subsampled to
    `max_per_side` rows: the kernel matrix is (2 x max_per_side)^2, ~0.1 s at 500 on two cores."""
    if len(reference) < 2 or len(recent) < 2:
        raise ValueError(f"need at least 2 rows on each side, got {len(reference)} reference and {len(recent)} recent")
    if reference.shape[1] != recent.shape[1]:
        raise ValueError(f"embedding widths differ: reference {reference.shape[1]}, recent {recent.shape[1]}")
    rng = np.random.default_rng(seed)
    x = _subsample(reference, max_per_side, rng)
    y = _subsample(recent, max_per_side, rng)
    kernel = rbf_kernel_matrix(np.vstack([x, y]))
    n = len(x) + len(y)
    observed_split = np.zeros((n, 1), dtype=bool)
    observed_split[: len(x), 0] = True
    observed = float(_mmd2_unbiased(kernel, observed_split)[0])
    shuffled = np.zeros((n, permutations), dtype=bool)
    for column in range(permutations):
        shuffled[rng.permutation(n)[: len(x)], column] = True
    null = _mmd2_unbiased(kernel, shuffled)
    return DriftResult(
        score=observed,
        threshold=float(np.quantile(null, 1.0 - alpha)),
        p_value=float((1 + np.sum(null >= observed)) / (1 + permutations)),
        n_reference=len(x),
        n_recent=len(y),
    )


@dataclass(frozen=True)
class ClassEstimate:
    precision: float | None  # None: the model predicts no text as this class
    recall: float | None  # None: the probabilities put (almost) no mass on this class
    predicted: int
    expected_support: float


def estimate_performance(probs: np.ndarray, labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """Expected per-class precision and recall of the argmax prediction, and expected accuracy, from the
    probabilities alone (rows: texts, columns: `labels`); see the module docstring."""
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probabilities must be (texts, {len(labels)}), got {probs.shape}")
    predicted = probs.argmax(axis=1)
    per_class: dict[str, ClassEstimate] = {}
    for k, label in enumerate(labels):
        chosen = predicted == k
        true_positives = float(probs[chosen, k].sum())
        support = float(probs[:, k].sum())
        per_class[label] = ClassEstimate(
            precision=true_positives / int(chosen.sum()) if chosen.any() else None,
            recall=true_positives / support if support > 1e-9 else None,
            predicted=int(chosen.sum()),
            expected_support=support,
        )
    return {
        "accuracy": float(probs.max(axis=1).mean()) if len(probs) else None,
        "texts": len(probs),
        "per_class": per_class,
    }
