"""The one evaluation: a model's classification report on labeled examples.

`classification_report` is the report over the six labels (macro-F1 is the headline: the rare classes count as
much as the common ones); training's early stopping and the export check use it on their own predictions.
`evaluate` scores a served (ONNX) model one text per forward pass, as a lone request is served. `guardloop eval`,
the cycle's gate and the simulation all report through `report_from_probs`, so their numbers mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from guardloop.core.datafiles import Example
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


def report_from_probs(examples: Sequence[Example], probs: np.ndarray) -> dict[str, Any]:
    """The classification report of the argmax of `probs` (rows in LABELS order) against the examples' labels."""
    return classification_report([ex.label or "" for ex in examples], [LABELS[i] for i in probs.argmax(axis=1)])


def served_probs(classifier: OnnxClassifier, examples: Sequence[Example]) -> np.ndarray:
    """The served model's scores for `examples`, one text at a time (as a lone request is served)."""
    return classifier.predict_many([ex.text for ex in examples], batch_size=1)


def evaluate(classifier: OnnxClassifier, examples: Sequence[Example]) -> dict[str, Any]:
    """The report of a served model on `examples`, scored one text at a time (as served)."""
    return report_from_probs(examples, served_probs(classifier, examples))
