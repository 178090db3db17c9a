"""The one evaluation: a model's classification report on labeled examples.

`evaluate` scores a served (ONNX) model one text per forward pass, as a lone request is served: dynamic int8
quantization scales activations per batch, so a text's scores move slightly with its batch-mates (up to ~0.7
macro-F1 points measured here). `guardloop eval`, the cycle's gate and the simulation all report through
`report_from_probs`, so their numbers mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.trainer.metrics import classification_report

from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS


def report_from_probs(examples: Sequence[Example], probs: np.ndarray) -> dict[str, Any]:
    """The classification report of the argmax of `probs` (rows in LABELS order) against the examples' labels."""
    return classification_report([ex.label or "" for ex in examples], [LABELS[i] for i in probs.argmax(axis=1)])


def served_probs(classifier: OnnxClassifier, examples: Sequence[Example]) -> np.ndarray:
    """The served model's scores for `examples`, one text at a time (as a lone request is served)."""
    return classifier.predict_many([ex.text for ex in examples], batch_size=1)


def evaluate(classifier: OnnxClassifier, examples: Sequence[Example]) -> dict[str, Any]:
    """The report of a served model on `examples`, scored one text at a time (as served)."""
    return report_from_probs(examples, served_probs(classifier, examples))
