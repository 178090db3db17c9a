"""A text's scores depend on the text alone, never on the texts that share its forward pass (issue 12, item 4).

Fast tests use hand-built ONNX graphs that make each hazard explicit (an output that depends on the padded
width; a DynamicQuantizeLinear whose scale spans the batch). Slow tests put a tiny BERT through the real export
path (dynamic int8, the default, and static int8) and through the service.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
from guardloop.models.onnx_model import PAD_MULTIPLE, OnnxClassifier, padded_length
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.export import STATIC
from onnx import TensorProto, helper

from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_EVAL, SEED_TRAIN
from guardloop.core.settings import Settings
from tests.conftest import live_server
from tests.tiny_onnx import (
    VOCAB,
    pooled_embedding_nodes,
    pooling_axes,
    publish_dir,
    write_exported_model,
    write_graph_model,
)

TOLERANCE = 1e-6


def _texts(path: Path) -> list[str]:
    import json

    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


EVAL_TEXTS = _texts(SEED_EVAL)
# Batch-mates of every length, from one word to past max_seq_len.
MATES = [*_texts(SEED_TRAIN), "ok", "hi there", " ".join(["word"] * 150), "why " * 40]


def _initializers(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "table": rng.normal(0, 1, size=(VOCAB, len(LABELS))).astype(np.float32),
        **pooling_axes(),
    }


def write_width_sensitive_model(out_dir: Path) -> Path:
    """Logits = pooled embedding + 0.01 x the padded width on one label: a text run at another width scores
    differently."""
    nodes = [
        *pooled_embedding_nodes(),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["widthf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["widthf", "hundredth"], ["shift"]),
        helper.make_node("Add", ["pooled", "shift"], ["logits"]),
    ]
    initializers = _initializers() | {
        "one": np.array(1, dtype=np.int64),
        "hundredth": np.array([0.01] + [0.0] * (len(LABELS) - 1), dtype=np.float32),  # one label: softmax moves
    }
    return write_graph_model(out_dir, nodes, initializers, outputs=len(LABELS))


def write_dynamic_quantized_model(out_dir: Path) -> Path:
    """The pooled embedding through DynamicQuantizeLinear: one u8 scale for the whole batch tensor, as in the
    dynamic int8 MiniLM. A batch-mate with a larger activation coarsens every other row's values."""
    nodes = [
        *pooled_embedding_nodes(),
        helper.make_node("DynamicQuantizeLinear", ["pooled"], ["q", "scale", "zero"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["logits"]),
    ]
    return write_graph_model(out_dir, nodes, _initializers(), outputs=len(LABELS))


def max_batch_drift(classifier: OnnxClassifier, targets: list[str], trials: int = 30, seed: int = 0) -> float:
    """Largest |score alone - score among random batch-mates| over `targets`, random batch sizes and positions."""
    rng = random.Random(seed)
    worst = 0.0
    for target in targets:
        alone = classifier.predict_proba([target])[0]
        for _ in range(trials):
            batch = rng.sample(MATES, rng.randint(1, 31))
            position = rng.randint(0, len(batch))
            batch.insert(position, target)
            worst = max(worst, float(np.abs(classifier.predict_proba(batch)[position] - alone).max()))
    return worst


def test_padded_length_depends_on_the_text_alone():
    assert [padded_length(n, 128) for n in (0, 1, 7, 8, 9, 16, 17)] == [8, 8, 8, 8, 16, 16, 24]
    assert padded_length(127, 128) == 128
    assert padded_length(200, 64) == 64  # truncated texts run at max_seq_len
    assert all(padded_length(n, 512) % PAD_MULTIPLE == 0 for n in range(1, 513))


def test_a_text_always_runs_at_its_own_padded_width(tmp_path):
    classifier = OnnxClassifier(write_width_sensitive_model(tmp_path / "m"), version="w")
    assert classifier.batches_rows_together
    assert max_batch_drift(classifier, EVAL_TEXTS[:10]) <= TOLERANCE
    # predict_many sorts and batches differently, with the same rows.
    alone = np.stack([classifier.predict_proba([t])[0] for t in MATES[:100]])
    assert np.abs(classifier.predict_many(MATES[:100], batch_size=7) - alone).max() <= TOLERANCE


def test_a_dynamic_int8_graph_runs_each_text_on_its_own(tmp_path):
    classifier = OnnxClassifier(write_dynamic_quantized_model(tmp_path / "m"), version="d")
    assert not classifier.batches_rows_together
    assert max_batch_drift(classifier, EVAL_TEXTS[:10], trials=10) <= TOLERANCE
    # The hazard is real: the same graph run as one batch moves a row's scores (short mates widen the range).
    texts = ["hello there", "ok", "why", "no", "yes", "stop", "help", "now", "maybe", "never", "sure"]
    encodings = classifier.tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)], mask[row, : len(encoding.ids)] = encoding.ids, 1
    (together,) = classifier.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    assert np.abs(together[0][classifier._reorder] - classifier.logits(texts[:1])[0]).max() > 1e-3


# ------------------------------------------------------------------------------------ the real export path
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    return {
        "static": write_exported_model(root / "static", quantization=STATIC),
        "dynamic": write_exported_model(root / "dynamic"),  # the export default
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_exported_int8_scores_do_not_move_with_batch_mates(exported, variant):
    classifier = OnnxClassifier(exported[variant], version=variant, max_seq_len=64)
    # Static int8 runs in batches; dynamic int8 (the export default, and every older registry version) one text
    # per call.
    assert classifier.batches_rows_together is (variant == "static")
    probs = classifier.predict_proba(EVAL_TEXTS)
    assert probs.std(axis=0).max() > 0.02  # the scores differ between texts, so a drift would show
    assert max_batch_drift(classifier, EVAL_TEXTS[:8]) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_the_service_gives_one_text_the_same_scores_among_200_concurrent_requests(exported, variant, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    publish_dir(registry, exported[variant])
    # A short wait lets concurrent requests share forward passes, so batch-mates really vary.
    settings = Settings(registry_dir=registry.root, data_dir=tmp_path / "data", batch_max_wait_ms=2, pool_enabled=False)
    target = "I keep the pills in my drawer just in case things get worse"
    rng = random.Random(1)
    bodies = []
    for _ in range(200):
        bodies.append({"text": target})
        bodies.append({"texts": rng.sample(MATES, rng.randint(1, 4))})
    rng.shuffle(bodies)

    async def send_all(base_url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            responses = await asyncio.gather(*(client.post("/classify", json=body) for body in bodies))
        assert {r.status_code for r in responses} == {200}
        return [r.json() for r, body in zip(responses, bodies, strict=True) if body.get("text") == target]

    with live_server(settings) as base_url:
        answers = asyncio.run(send_all(base_url))
    assert len(answers) == 200
    scores = np.array([[a["results"][0]["scores"][label] for label in LABELS] for a in answers])
    assert np.abs(scores - scores[0]).max() <= TOLERANCE
