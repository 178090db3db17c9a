"""A real, tiny ONNX text classifier for fast tests of the serving path.

It is a genuine ONNX graph run by a genuine ONNX Runtime session and tokenized by the student's real
tokenizer: an embedding table mean-pooled over the attention mask, plus a bias. `favour` adds a large
bias to one label so that two versions are told apart by their answers (hot-swap tests).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from guardloop.models.registry import ModelCard, ModelRegistry
from guardloop.trainer.base_models import minilm_dir
from onnx import TensorProto, helper, numpy_helper

from guardloop.core.labels import LABELS

VOCAB = 30522


def write_tiny_model(
    out_dir: Path, *, favour: str | None = None, seed: int = 0, labels: list[str] | None = None
) -> Path:
    labels = labels or list(LABELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, size=(VOCAB, len(labels))).astype(np.float32)
    bias = np.zeros(len(labels), dtype=np.float32)
    if favour:
        bias[labels.index(favour)] = 20.0
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("Add", ["pooled", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, out_dir / "model.onnx")
    shutil.copyfile(minilm_dir() / "tokenizer.json", out_dir / "tokenizer.json")
    (out_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return out_dir


def publish_tiny(
    registry: ModelRegistry, tmp: Path, *, favour: str | None = None, make_current: bool = True, seed: int = 0
) -> str:
    staging = write_tiny_model(
        tmp / f"staging-{favour}-{seed}-{datetime.now(UTC).timestamp()}", favour=favour, seed=seed
    )
    return publish_dir(registry, staging, make_current=make_current)


def write_graph_model(
    out_dir: Path,
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray],
    *,
    outputs: int,
    labels: list[str] | None = None,
) -> Path:
    """A model directory from any graph on `input_ids`/`attention_mask` that ends in `logits` (batch, outputs).

    For models the service must refuse (wrong output width, NaN scores) or that are big enough to measure memory.
    """
    labels = labels or list(LABELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        nodes,
        "test-model",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, out_dir / "model.onnx")
    shutil.copyfile(minilm_dir() / "tokenizer.json", out_dir / "tokenizer.json")
    (out_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return out_dir


def pooled_embedding_nodes() -> list[onnx.NodeProto]:
    # The mean of the token embeddings over the attention mask: `pooled` (batch, width of `table`).
    return [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
    ]


def pooling_axes() -> dict[str, np.ndarray]:
    return {"axis2": np.array([2], dtype=np.int64), "axis1": np.array([1], dtype=np.int64)}


def write_wide_model(out_dir: Path, *, hidden: int = 256, seed: int = 0) -> Path:
    """A working classifier with a (VOCAB x hidden) embedding table: `hidden`=256 makes ~31 MB of weights, enough
    that a model kept alive after a swap shows in the process's resident memory."""
    rng = np.random.default_rng(seed)
    initializers = {
        "table": rng.normal(0, 1, size=(VOCAB, hidden)).astype(np.float32),
        "head": rng.normal(0, 0.1, size=(hidden, len(LABELS))).astype(np.float32),
        **pooling_axes(),
    }
    nodes = [*pooled_embedding_nodes(), helper.make_node("MatMul", ["pooled", "head"], ["logits"])]
    return write_graph_model(out_dir, nodes, initializers, outputs=len(LABELS))


def write_broken_model(out_dir: Path, *, fault: str) -> Path:
    """A model that loads but gives unusable scores, so only its warm-up can tell: `fault` is "shape" (one
    output column more than it has labels) or "nan" (every score NaN)."""
    width = len(LABELS) + 1 if fault == "shape" else len(LABELS)
    rng = np.random.default_rng(0)
    bias = np.zeros(width, dtype=np.float32)
    if fault == "nan":
        bias[:] = np.nan
    elif fault != "shape":
        raise ValueError(f"unknown fault {fault!r}: 'shape' or 'nan'")
    initializers = {"table": rng.normal(0, 1, size=(VOCAB, width)).astype(np.float32), "bias": bias, **pooling_axes()}
    nodes = [*pooled_embedding_nodes(), helper.make_node("Add", ["pooled", "bias"], ["logits"])]
    return write_graph_model(out_dir, nodes, initializers, outputs=width)


def publish_dir(registry: ModelRegistry, staging: Path, *, make_current: bool = True) -> str:
    """Publish an already written model directory under a new version name, with a plain card."""
    version = registry.new_version_name()
    card = ModelCard(
        version=version,
        created_at=datetime.now(UTC),
        labels=list(LABELS),
        thresholds=dict.fromkeys(LABELS, 0.5),
        metrics={"dev": {"macro_f1": 0.5}},
        parent=registry.current(),
    )
    registry.publish(staging, card, make_current=make_current)
    return version


def write_exported_model(out_dir: Path, *, quantization: str | None = None, seed: int = 0) -> Path:
    """A tiny random BERT (2 layers, hidden 64) with the student's tokenizer, put through the real export path
    (optimum ONNX export, then `quantization`: the export default when None) and calibrated on the seed texts.

    Unlike the graphs above it has everything that can make a row depend on its batch-mates: attention over
    padded positions, LayerNorm, and int8 MatMuls (dynamic or static scales). Takes ~10 s: use in slow tests.
    """
    import torch
    from guardloop.trainer.export import QUANTIZATION, export_onnx
    from guardloop.trainer.finetune import FineTuneResult
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from guardloop.core.seed import SEED_TRAIN

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=len(LABELS),
        initializer_range=0.2,  # large enough that the scores are far from uniform and differences show
    )
    model = BertForSequenceClassification(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    texts = [json.loads(line)["text"] for line in SEED_TRAIN.read_text(encoding="utf-8").splitlines() if line]
    result = FineTuneResult(model=model, tokenizer=tokenizer, best_epoch=0, dev_report=None)
    export_onnx(result, out_dir, quantization=quantization or QUANTIZATION, calibration_texts=texts)
    return out_dir
