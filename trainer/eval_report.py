"""What `guardloop eval` adds to the classification report: critical misses, bootstrap intervals, PR curves.

- Critical miss rate: the share of gold self-harm and emergency-situation texts that the served decision does
  not flag at all (no harmful category reaches its threshold). A critical text flagged as, say, medical-advice
  still gets a warning; one flagged as nothing gets none, which is the failure that matters most.
- Bootstrap intervals: a test set of a few hundred texts with a few dozen self-harm ones moves macro-F1 by
  points between draws; a percentile interval (texts resampled with replacement) says how far to trust a
  difference between two models.
- Precision-recall curves: one-vs-rest on each category's own score, the rule thresholds act on, with the
  current threshold marked, so an operator sees what moving a threshold would buy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from guardloop.core.labels import LABELS, SAFE_LABEL

CRITICAL_LABELS: tuple[str, ...] = ("self-harm", "emergency-situation")
RESAMPLES = 1000
CONFIDENCE = 0.95


def flagged_rows(probs: np.ndarray, verdict: Callable[[np.ndarray], Any]) -> list[bool]:
    """Whether the served decision flags each row: `verdict` is `OnnxClassifier.verdict`, the service.s rule."""
    return [bool(verdict(row).flagged) for row in probs]


def critical_misses(y_true: Sequence[str], flagged: Sequence[bool]) -> dict[str, Any]:
    """Share of gold critical texts not flagged at all, overall and per critical label (None without such texts)."""
    truth, flags = np.asarray(y_true), np.asarray(flagged, dtype=bool)

    def rate(mask: np.ndarray) -> dict[str, Any]:
        n, missed = int(mask.sum()), int((mask & ~flags).sum())
        return {"rate": missed / n if n else None, "missed": missed, "n": n}

    return {
        "labels": list(CRITICAL_LABELS),
        **rate(np.isin(truth, CRITICAL_LABELS)),
        "per_class": {label: rate(truth == label) for label in CRITICAL_LABELS},
    }


def f1_from_confusions(confusions: np.ndarray) -> np.ndarray:
    """Per-class F1 of each confusion matrix in a stack (..., K, K); 0 where a class is neither true nor predicted
    (scikit-learn's zero_division=0, as `classification_report`)."""
    tp = np.diagonal(confusions, axis1=-2, axis2=-1)
    denominator = confusions.sum(axis=-1) + confusions.sum(axis=-2)  # 2tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=float), where=denominator > 0)


def bootstrap_f1(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    random_state: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for macro-F1 and each class's F1 (texts resampled with replacement).

    Vectorized over resamples (one bincount of all of them) rather than scipy.stats.bootstrap, which would call
    a Python statistic per resample for paired labels; the same `random_state` gives the same interval.
    """
    k = len(LABELS)
    index = {label: i for i, label in enumerate(LABELS)}
    codes = np.array([index[t] * k + index[p] for t, p in zip(y_true, y_pred, strict=True)], dtype=np.int64)
    if codes.size == 0:
        raise ValueError("no examples to bootstrap")
    rng = np.random.default_rng(random_state)
    draws = codes[rng.integers(0, codes.size, size=(resamples, codes.size))]
    offsets = (np.arange(resamples, dtype=np.int64) * k * k)[:, None]
    confusions = np.bincount((draws + offsets).ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    f1 = f1_from_confusions(confusions)  # (resamples, K)
    point = f1_from_confusions(np.bincount(codes, minlength=k * k).reshape(k, k))
    tail = (1 - confidence) / 2 * 100

    def interval(values: np.ndarray, estimate: float) -> dict[str, float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return {"estimate": float(estimate), "low": float(low), "high": float(high)}

    return {
        "confidence": confidence,
        "resamples": resamples,
        "random_state": random_state,
        "macro_f1": interval(f1.mean(axis=1), point.mean()),
        "per_class_f1": {label: interval(f1[:, i], point[i]) for i, label in enumerate(LABELS)},
    }


def average_precisions(y_true: Sequence[str], probs: np.ndarray) -> dict[str, float | None]:
    """Area under each class's one-vs-rest precision-recall curve (None for a class without gold texts)."""
    truth = np.asarray(y_true)
    return {
        label: float(average_precision_score(truth == label, probs[:, i])) if (truth == label).any() else None
        for i, label in enumerate(LABELS)
    }


def check_plot_path(path: Path) -> None:
    """Raise ValueError (message says what to fix) before any scoring when the PNG could not be written there."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the curves are written as PNG; give a file name ending in .png")
    if not path.parent.is_dir():
        raise ValueError(f"--plot {path}: no such directory {path.parent}; create it or choose another path")
    if path.is_dir():
        raise ValueError(f"--plot {path}: is a directory; give a file name ending in .png")


def plot_pr_curves(
    y_true: Sequence[str], probs: np.ndarray, thresholds: dict[str, float], path: Path, *, title: str = ""
) -> Path:
    """One panel per class: its precision-recall curve (one-vs-rest on its score), the current threshold marked.

    not-harmful is never flagged and has no operating point; its curve is drawn for completeness.
    """
    # matplotlib is heavy (~0.5 s import) and only `eval --plot` needs it, so it is imported here, headless (Agg).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.asarray(y_true)
    figure, axes = plt.subplots(2, 3, figsize=(13, 8.5), sharex=True, sharey=True)
    for i, (label, ax) in enumerate(zip(LABELS, axes.ravel(), strict=True)):
        positives = truth == label
        ax.set_title(f"{label} (n={int(positives.sum())})")
        ax.grid(alpha=0.3)
        if not positives.any():
            ax.text(0.5, 0.5, "no gold texts", ha="center", va="center", transform=ax.transAxes)
            continue
        scores = probs[:, i]
        precision, recall, _ = precision_recall_curve(positives, scores)
        ap = average_precision_score(positives, scores)
        ax.step(recall, precision, where="post", label=f"AP {ap:.3f}")
        ax.axhline(positives.mean(), color="grey", linestyle=":", linewidth=1, label="chance")
        if label != SAFE_LABEL:
            threshold = thresholds.get(label, 0.5)
            flagged = scores >= threshold
            tp = int((flagged & positives).sum())
            p_at = tp / flagged.sum() if flagged.any() else 1.0
            r_at = tp / positives.sum()
            ax.plot([r_at], [p_at], "o", color="red", label=f"threshold {threshold:.3f}: P {p_at:.2f} R {r_at:.2f}")
        ax.legend(loc="lower left", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    axes[0, 0].set_xlim(0, 1.02)
    axes[0, 0].set_ylim(0, 1.05)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path


def extended_report(
    y_true: Sequence[str],
    probs: np.ndarray,
    verdict: Callable[[np.ndarray], Any],
    *,
    resamples: int = RESAMPLES,
    random_state: int = 0,
) -> dict[str, Any]:
    """The numbers `guardloop eval` adds to `report_from_probs`: critical misses (served decision, `verdict`),
    bootstrap F1 intervals (of the argmax, as the report) and each class's average precision."""
    return {
        "critical_misses": critical_misses(y_true, flagged_rows(probs, verdict)),
        "bootstrap": bootstrap_f1(
            y_true, [LABELS[i] for i in probs.argmax(axis=1)], resamples=resamples, random_state=random_state
        ),
        "average_precision": average_precisions(y_true, probs),
    }
