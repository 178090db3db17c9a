"""A real tiny ONNX model whose answer depends on the words in the text, for tests that need different
verdicts for different texts (conversation context, guidance, calibration).

It is tests/tiny_onnx.py's graph (embedding table mean-pooled over the tokens, plus a bias) with a
hand-set table: a keyword's token row pushes its label up by `weight`, and every other token is neutral,
so a text without keywords gets the bias's label (not-harmful by default).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from guardloop.models.registry import ModelCard, ModelRegistry
from onnx import numpy_helper
from tokenizers import Tokenizer

from guardloop.core.labels import LABELS
from tests.tiny_onnx import write_tiny_model


def publish_keyword_model(
    registry: ModelRegistry,
    tmp: Path,
    keywords: dict[str, tuple[str, float]],
    *,
    default_label: str = "not-harmful",
    default_bias: float = 2.0,
) -> str:
    """Publish (as current) a model where `word` adds `weight` to `label` for each `word: (label, weight)`."""
    staging = write_keyword_model(
        tmp / f"staging-keywords-{datetime.now(UTC).timestamp()}",
        keywords,
        default_label=default_label,
        default_bias=default_bias,
    )
    version = registry.new_version_name()
    card = ModelCard(
        version=version,
        created_at=datetime.now(UTC),
        labels=list(LABELS),
        thresholds=dict.fromkeys(LABELS, 0.5),
        parent=registry.current(),
    )
    registry.publish(staging, card)
    return version


def write_keyword_model(
    out_dir: Path,
    keywords: dict[str, tuple[str, float]],
    *,
    default_label: str = "not-harmful",
    default_bias: float = 2.0,
) -> Path:
    """The keyword model's directory (model.onnx, tokenizer.json, labels.json) in `out_dir`, unpublished."""
    staging = write_tiny_model(out_dir)
    tokenizer = Tokenizer.from_file(str(staging / "tokenizer.json"))
    model = onnx.load(staging / "model.onnx")
    table = np.zeros((tokenizer.get_vocab_size(), len(LABELS)), dtype=np.float32)
    for word, (label, weight) in keywords.items():
        token_id = tokenizer.token_to_id(word)
        assert token_id is not None, f"{word!r} is not one token of the vocabulary"
        table[token_id, LABELS.index(label)] = weight
    bias = np.zeros(len(LABELS), dtype=np.float32)
    bias[LABELS.index(default_label)] = default_bias
    for initializer in model.graph.initializer:
        if initializer.name == "table":
            initializer.CopyFrom(numpy_helper.from_array(table, "table"))
        elif initializer.name == "bias":
            initializer.CopyFrom(numpy_helper.from_array(bias, "bias"))
    onnx.save(model, staging / "model.onnx")
    return staging
