"""Classification metrics over the six labels; macro-F1 is the headline (the rare classes count as much)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from guardloop.core.labels import LABELS


def classification_report(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    labels = list(LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class_f1": {label: float(v) for label, v in zip(labels, f1, strict=True)},
        "per_class_precision": {label: float(v) for label, v in zip(labels, precision, strict=True)},
        "per_class_recall": {label: float(v) for label, v in zip(labels, recall, strict=True)},
        "support": {label: int(v) for label, v in zip(labels, support, strict=True)},
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
