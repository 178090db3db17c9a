"""The exported ONNX model is the torch model it came from, checked independently of the export's own check.

`train_model` writes an agreement figure into the card (trainer/export.py) and refuses to publish when the
export disagrees with torch (trainer/train.py). Here raw ONNX Runtime sessions and the torch model are run side
by side on the same texts, one text at a time, without the project's scoring code; and exports broken on
purpose (shuffled output columns, a skewed bias) must leave the registry untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from guardloop.models.registry import ModelCard, ModelRegistry
from guardloop.trainer import train as train_module
from guardloop.trainer.export import export_onnx
from guardloop.trainer.finetune import FineTuneConfig, FineTuneResult
from guardloop.trainer.train import ExportCheckFailed, TrainJob, train_and_publish, train_model
from typer.testing import CliRunner

from guardloop.core.datafiles import load_examples
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from tests.tiny_bert import write_tiny_bert

pytestmark = pytest.mark.slow  # a real (tiny) training and optimum export: ~40 s here
torch.set_num_threads(1)
MAX_LEN = 32


@dataclass
class Exported:
    job: TrainJob
    result: FineTuneResult  # the torch model train_model exported
    staging: Path  # what would be published: the int8 model
    card: ModelCard


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def exported(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The real train path (fine-tune, optimum export, int8, check) on a tiny BERT overfit to 58 seed texts."""
    captured: list[FineTuneResult] = []
    real_fine_tune = train_module.fine_tune

    def capturing_fine_tune(*args, **kwargs):
        captured.append(real_fine_tune(*args, **kwargs))
        return captured[-1]

    examples = load_examples([SEED_DIR / "train.jsonl"]).examples[::9]
    job = TrainJob(
        train=examples,
        dev=None,
        config=FineTuneConfig(epochs=12, learning_rate=5e-3, max_seq_len=MAX_LEN),
        fingerprints={},
        progress=False,
        base_model=tiny_base,  # as `guardloop train --base-model DIR`
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "fine_tune", capturing_fine_tune)
        staging, card = train_model(job, tmp_path_factory.mktemp("work"))
    return Exported(job, captured[0], staging, card)


def torch_probs(result: FineTuneResult, texts: list[str]) -> np.ndarray:
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = result.tokenizer(text, truncation=True, max_length=MAX_LEN, return_tensors="pt")
            rows.append(torch.softmax(result.model(**batch).logits, dim=-1)[0].numpy())
    return np.stack(rows)


def onnx_logits(model_file: Path, result: FineTuneResult, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    rows = []
    for text in texts:
        encoded = result.tokenizer(text, truncation=True, max_length=MAX_LEN, return_tensors="np")
        feed = {name: encoded[name].astype(np.int64) for name in wanted}
        rows.append(session.run(None, feed)[0][0])
    return np.stack(rows)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def check_texts(job: TrainJob) -> list[str]:
    """The texts train_model checks on (dev, then every n-th training text): the card's figure is about these."""
    pairs = list(job.dev or []) + list(job.train[:: max(1, len(job.train) // 300)])
    return [ex.text for ex in pairs]


def test_the_fp32_export_computes_the_torch_models_logits(exported, tmp_path):
    export_onnx(exported.result, tmp_path / "fp32", quantize=False)
    texts = check_texts(exported.job)
    expected = torch_probs(exported.result, texts)
    got = softmax(onnx_logits(tmp_path / "fp32" / "model.onnx", exported.result, texts))
    np.testing.assert_allclose(got, expected, atol=1e-4)  # same columns, same order, same weights
    assert (expected.max(axis=1) > 0.3).mean() > 0.5  # a trained model, not uniform noise: a column swap shows
    labels = (tmp_path / "fp32" / "labels.json").read_text(encoding="utf-8")
    assert labels == (exported.staging / "labels.json").read_text(encoding="utf-8")
    assert [exported.result.model.config.id2label[i] for i in range(len(LABELS))] == list(LABELS)


def test_an_operators_base_model_directory_is_trained_exported_and_named_on_the_card(exported, tiny_base):
    assert exported.card.base_model == str(tiny_base)
    assert (exported.staging / "model.onnx").is_file() and (exported.staging / "tokenizer.json").is_file()


def test_the_served_int8_model_agrees_with_torch_as_the_card_says(exported):
    graph_ops = {node.op_type for node in onnx.load(str(exported.staging / "model.onnx")).graph.node}
    assert any("Quant" in op or "Integer" in op for op in graph_ops), graph_ops  # the int8 model is what ships
    texts = check_texts(exported.job)
    expected = torch_probs(exported.result, texts)
    served = softmax(onnx_logits(exported.staging / "model.onnx", exported.result, texts))
    agreement = float((expected.argmax(axis=1) == served.argmax(axis=1)).mean())
    mean_diff = float(np.abs(expected - served).mean())

    check = exported.card.metrics["onnx_check"]
    assert check["n"] == len(texts)
    assert agreement >= 0.9 and mean_diff < 0.02
    # The card scores in length-sorted batches (int8 scales move a little with batch-mates): near, not equal.
    assert check["agreement"] == pytest.approx(agreement, abs=0.05)
    assert check["mean_abs_prob_diff"] == pytest.approx(mean_diff, abs=0.01)
    gold = [ex.label for ex in exported.job.train]
    torch_accuracy = float(np.mean([LABELS[i] == y for i, y in zip(expected.argmax(axis=1), gold, strict=True)]))
    assert torch_accuracy > 0.5  # trained: the comparison is between two confident models


def shuffled_columns(model: torch.nn.Module) -> None:
    """Rotate the classifier's output rows: every label's score lands in the next label's column."""
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.roll(1, dims=0))
        model.classifier.bias.copy_(model.classifier.bias.roll(1, dims=0))


def skewed_bias(model: torch.nn.Module) -> None:
    """A bias that says `not-harmful` whatever the text."""
    with torch.no_grad():
        model.classifier.bias[LABELS.index("not-harmful")] += 20.0


def broken_export(breakage):
    """An export_onnx that writes a damaged copy of the model (the torch model itself stays intact)."""

    def export(result: FineTuneResult, staging_dir: Path, **options: Any) -> Any:
        damaged = copy.deepcopy(result.model)
        breakage(damaged)
        return export_onnx(dataclasses.replace(result, model=damaged), staging_dir, **options)

    return export


@pytest.mark.parametrize("breakage", [shuffled_columns, skewed_bias], ids=["shuffled-columns", "skewed-bias"])
def test_a_broken_export_publishes_nothing(exported, tmp_path, monkeypatch, breakage):
    registry = ModelRegistry(tmp_path / "registry")
    monkeypatch.setattr(train_module, "fine_tune", lambda *args, **kwargs: exported.result)  # skip retraining
    monkeypatch.setattr(train_module, "export_onnx", broken_export(breakage))
    with pytest.raises(ExportCheckFailed, match="not published"):
        train_and_publish(exported.job, registry)
    assert registry.versions() == [] and registry.current() is None
    assert not registry.root.exists() or list(registry.root.iterdir()) == []  # no staging left behind either


def test_guardloop_train_with_a_broken_export_ends_with_one_line(exported, tmp_path, monkeypatch):
    from guardloop.cli import app

    data = tmp_path / "train.jsonl"
    lines = (SEED_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()[::9]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setenv("GUARDLOOP_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("GUARDLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(train_module, "fine_tune", lambda *args, **kwargs: exported.result)
    monkeypatch.setattr(train_module, "export_onnx", broken_export(skewed_bias))

    result = CliRunner().invoke(app, ["train", "--data", str(data), "--epochs", "1"])

    assert result.exit_code == 2, (result.output, result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "not published" in error_lines[0], result.stderr
    assert "Traceback" not in result.output
    assert ModelRegistry(tmp_path / "registry").versions() == []
