"""The training recipe's three promises (trainer/finetune.py, trainer/train.py), each on a tiny real BERT:

- class-weighted loss: each class weighs (n / (K * count))^power, so a rare class's examples pull harder;
- early stopping: training stops `patience` epochs after the best dev macro-F1 and keeps that epoch's weights;
- distillation: a teacher's soft labels (temperature 2) teach the student, unlabeled texts included.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from guardloop.trainer import base_models, finetune
from guardloop.trainer import train as train_module
from guardloop.trainer.finetune import FineTuneConfig, TrainingExample, class_weights, fine_tune, predict_proba
from torch.nn import functional as F

from guardloop.core.datafiles import Example, load_examples
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from tests.tiny_bert import write_tiny_bert

torch.set_num_threads(1)  # tiny models; the test machine's cores are shared


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def seed_examples() -> list[Example]:
    return load_examples([SEED_DIR / "train.jsonl"]).examples


# --------------------------------------------------------------------------------------------- class weights
def test_class_weights_follow_the_documented_formula():
    counts = {"not-harmful": 12, "legal-advice": 6, "medical-advice": 3, "financial-advice": 2, "self-harm": 1}
    labels = [label for label, n in counts.items() for _ in range(n)]  # emergency-situation: absent
    n, k = len(labels), len(LABELS)
    for power in (0.5, 1.0, 0.0):
        expected = [(n / (k * counts[label])) ** power if label in counts else 0.0 for label in LABELS]
        np.testing.assert_allclose(class_weights(labels, power).numpy(), expected, rtol=1e-6)
    default = class_weights(labels, FineTuneConfig().class_weight_power)
    assert default[LABELS.index("self-harm")] == pytest.approx((24 / 6) ** 0.5)  # the rare class: 2.0
    assert default[LABELS.index("not-harmful")] == pytest.approx((24 / 72) ** 0.5)  # the common one: 0.577


def logit_gradients(labels: list[str], weights: torch.Tensor) -> torch.Tensor:
    """Gradient of the training loss on identical (all-zero) logits, one row per example."""
    logits = torch.zeros(len(labels), len(LABELS), requires_grad=True)
    label_ids = torch.tensor([LABELS.index(label) for label in labels])
    soft = torch.full((len(labels), len(LABELS)), float("nan"))
    finetune._loss(logits, label_ids, soft, weights, FineTuneConfig()).backward()
    return logits.grad


def test_a_rare_class_example_pulls_harder_than_a_common_one():
    labels = ["not-harmful"] * 6 + ["self-harm"]
    weights = class_weights(labels, FineTuneConfig().class_weight_power)
    grads = logit_gradients(labels, weights).norm(dim=1)
    # Same logits, so the only difference in pull is the class weight: sqrt(7/6) vs sqrt(7/36).
    assert grads[-1] / grads[0] == pytest.approx(6**0.5, rel=1e-5)
    unweighted = logit_gradients(labels, class_weights(labels, 0.0)).norm(dim=1)
    assert unweighted[-1] / unweighted[0] == pytest.approx(1.0, rel=1e-5)


def test_fine_tune_trains_with_the_weights_of_its_labels(tiny_base, seed_examples, monkeypatch):
    """The loss `fine_tune` minimises gets the weights of its own training labels (not uniform, not stale)."""
    seen: list[torch.Tensor] = []
    real_loss = finetune._loss

    def recording_loss(logits, label_ids, soft, weights, config):
        seen.append(weights.clone())
        return real_loss(logits, label_ids, soft, weights, config)

    monkeypatch.setattr(finetune, "_loss", recording_loss)
    quota = dict(zip(LABELS, (16, 8, 6, 4, 3, 2), strict=True))  # an imbalanced slice of the (balanced) seed
    train: list[Example] = []
    for ex in seed_examples:
        if sum(e.label == ex.label for e in train) < quota[ex.label]:
            train.append(ex)
    fine_tune(tiny_base, [TrainingExample(ex.text, ex.label) for ex in train], None, small_config(epochs=1))
    expected = class_weights([ex.label for ex in train], 0.5)
    assert seen and all(torch.equal(w, expected) for w in seen)
    assert expected.max() > 2 * expected.min()  # a real weighting, not all ones


# --------------------------------------------------------------------------------------------- early stopping
def small_config(**overrides) -> FineTuneConfig:
    return FineTuneConfig(**{"batch_size": 16, "learning_rate": 1e-3, "max_seq_len": 32, **overrides})


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(tiny_base, seed_examples, monkeypatch):
    """Scripted dev scores (best at epoch 2): training ends at epoch 2 + patience with epoch 2's weights."""
    scripted = iter([0.30, 0.50, 0.45, 0.49, 0.60, 0.70])  # epochs 5 and 6 would beat epoch 2: they must not run
    snapshots: list[dict[str, torch.Tensor]] = []
    real_predict, real_report = finetune.predict_proba, finetune.classification_report

    def snapshot_predict(model, *args, **kwargs):
        snapshots.append(copy.deepcopy(model.state_dict()))  # the weights this epoch's dev score belongs to
        return real_predict(model, *args, **kwargs)

    def scripted_report(gold, predicted):
        return {**real_report(gold, predicted), "macro_f1": next(scripted)}

    monkeypatch.setattr(finetune, "predict_proba", snapshot_predict)
    monkeypatch.setattr(finetune, "classification_report", scripted_report)
    train = [TrainingExample(ex.text, ex.label) for ex in seed_examples[::10]]
    dev = [(ex.text, ex.label) for ex in seed_examples[5::40]]

    result = fine_tune(tiny_base, train, dev, small_config(epochs=6, patience=2), progress=False)

    assert [entry["epoch"] for entry in result.history] == [1, 2, 3, 4]
    assert [entry["dev_macro_f1"] for entry in result.history] == [0.30, 0.50, 0.45, 0.49]
    assert result.best_epoch == 2 and result.dev_report["macro_f1"] == 0.50
    final = result.model.state_dict()
    assert all(torch.equal(final[name], snapshots[1][name]) for name in final)  # epoch 2's weights ...
    assert not all(torch.equal(final[name], snapshots[3][name]) for name in final)  # ... not the last epoch's


def test_without_dev_data_every_epoch_runs_and_the_last_is_kept(tiny_base, seed_examples):
    train = [TrainingExample(ex.text, ex.label) for ex in seed_examples[::10]]
    result = fine_tune(tiny_base, train, None, small_config(epochs=3, patience=1), progress=False)
    assert len(result.history) == 3 and result.best_epoch == 3 and result.dev_report is None


# --------------------------------------------------------------------------------------------- distillation
def test_distillation_loss_is_temperature_scaled_kl_to_the_teacher():
    torch.manual_seed(0)
    logits = torch.randn(3, len(LABELS))
    teacher = torch.softmax(torch.randn(3, len(LABELS)) * 3, dim=-1)
    config = FineTuneConfig()
    assert config.distill_temperature == 2.0 and config.distill_alpha == 0.5
    t = 2.0
    soft_target = torch.softmax(torch.log(teacher) / t, dim=-1)
    kd = (soft_target * (soft_target.log() - torch.log_softmax(logits / t, dim=-1))).sum(dim=1).mean() * t * t
    unlabeled = torch.full((3,), -1)
    assert finetune._loss(logits, unlabeled, teacher, torch.ones(6), config).item() == pytest.approx(kd.item(), 1e-5)
    # Examples with a label and a teacher's opinion: alpha * hard + (1 - alpha) * soft.
    labels = torch.tensor([0, 3, 5])
    hard = F.cross_entropy(logits, labels)
    mixed = finetune._loss(logits, labels, teacher, torch.ones(6), config).item()
    assert mixed == pytest.approx(0.5 * hard.item() + 0.5 * kd.item(), 1e-5)
    # A student that already matches the softened teacher has nothing left to learn from it.
    matched = torch.log(teacher)  # logits whose softmax at T=2 is the teacher softened at T=2
    assert finetune._loss(matched, unlabeled, teacher, torch.ones(6), config).item() == pytest.approx(0.0, abs=1e-5)


def test_class_weighted_distillation_weighs_each_text_by_its_teacher_class():
    """distill_class_weighted: a text counts with the class weight of the teacher's top class, so a rare class's
    few texts are not outvoted by the common class's many (the weighted mean, as cross_entropy's `weight`)."""
    torch.manual_seed(1)
    logits = torch.randn(4, len(LABELS))
    teacher = torch.softmax(torch.randn(4, len(LABELS)), dim=-1)
    teacher[0] = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.75, 0.05])  # top class: emergency-situation
    teacher[1:] = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.05, 0.75])  # top class: not-harmful
    weights = torch.ones(len(LABELS))
    weights[LABELS.index("emergency-situation")] = 5.0
    unlabeled = torch.full((4,), -1)
    t = 2.0
    target = torch.softmax(torch.log(teacher) / t, dim=-1)
    per_text = (target * (target.log() - torch.log_softmax(logits / t, dim=-1))).sum(dim=1) * t * t
    plain = finetune._loss(logits, unlabeled, teacher, weights, FineTuneConfig()).item()
    weighted = finetune._loss(logits, unlabeled, teacher, weights, FineTuneConfig(distill_class_weighted=True)).item()
    assert plain == pytest.approx(per_text.mean().item(), 1e-5)  # off: class weights do not touch distillation
    text_weights = torch.tensor([5.0, 1.0, 1.0, 1.0])
    assert weighted == pytest.approx(((per_text * text_weights).sum() / text_weights.sum()).item(), 1e-5)
    assert weighted != pytest.approx(plain, 1e-3)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * (np.log(p + 1e-9) - np.log(q + 1e-9))).sum(axis=1).mean())


def test_soft_labels_on_unlabeled_texts_move_the_student_toward_the_teacher(tiny_base, seed_examples):
    """A teacher's opinion on texts no one labeled (here: these are financial) is learned by the student."""
    labeled = [TrainingExample(ex.text, ex.label) for ex in seed_examples[::6]]
    unlabeled = [ex.text for ex in seed_examples[3::6]]
    teacher = np.full((len(unlabeled), len(LABELS)), 0.02, dtype=np.float32)
    teacher[:, LABELS.index("financial-advice")] = 0.90
    config = small_config(epochs=3)
    with_soft = [*labeled, *(TrainingExample(text, None, teacher[i]) for i, text in enumerate(unlabeled))]

    student = fine_tune(tiny_base, with_soft, None, config, progress=False)
    alone = fine_tune(tiny_base, labeled, None, config, progress=False)

    taught = predict_proba(student.model, student.tokenizer, unlabeled, 32)
    untaught = predict_proba(alone.model, alone.tokenizer, unlabeled, 32)
    assert kl(teacher, taught) < kl(teacher, untaught) - 0.2
    financial = LABELS.index("financial-advice")
    assert taught[:, financial].mean() > untaught[:, financial].mean() + 0.08
    assert (taught.argmax(axis=1) == financial).mean() > (untaught.argmax(axis=1) == financial).mean() + 0.5


class StudentReached(Exception):
    """Stops `train_model` once the student's training data is known (export is tested elsewhere)."""


def test_train_job_with_a_teacher_gives_the_student_the_teachers_probabilities(
    tiny_base, seed_examples, tmp_path, monkeypatch
):
    """`guardloop train --teacher`: the teacher is fine-tuned on the labels, then soft-labels every text."""
    teacher_base = write_tiny_bert(tmp_path / "teacher", seed=1)
    monkeypatch.setattr(base_models, "mpnet_dir", lambda cache_dir: teacher_base)  # mpnet is optional here
    monkeypatch.setattr(base_models, "minilm_dir", lambda: tiny_base)
    calls: list[tuple[Path, list[TrainingExample]]] = []
    teachers: list = []

    def recording_fine_tune(base_dir, train, dev, config, *, progress=True):
        calls.append((base_dir, list(train)))
        if len(calls) == 2:
            raise StudentReached
        result = fine_tune(base_dir, train, dev, config, progress=progress)
        teachers.append(result)
        return result

    monkeypatch.setattr(train_module, "fine_tune", recording_fine_tune)
    train = seed_examples[::10]
    unlabeled = [ex.text for ex in seed_examples[5::20]]
    job = train_module.TrainJob(
        train=train,
        dev=None,
        config=small_config(epochs=1),
        fingerprints={},
        unlabeled=unlabeled,
        teacher="mpnet",
        teacher_epochs=2,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    with pytest.raises(StudentReached):
        train_module.train_model(job, tmp_path / "work")

    (teacher_dir, teacher_data), (student_dir, student_data) = calls
    assert teacher_dir == teacher_base and student_dir == tiny_base
    assert [(ex.text, ex.label, ex.soft) for ex in teacher_data] == [(ex.text, ex.label, None) for ex in train]
    assert len(teachers[0].history) == 2  # teacher_epochs
    assert [ex.text for ex in student_data] == [ex.text for ex in train] + unlabeled
    assert [ex.label for ex in student_data] == [ex.label for ex in train] + [None] * len(unlabeled)
    expected = predict_proba(teachers[0].model, teachers[0].tokenizer, [ex.text for ex in student_data], 32)
    np.testing.assert_allclose(np.stack([ex.soft for ex in student_data]), expected, atol=1e-6)


def test_the_preparedness_supplement_loads_as_emergency_posts_the_seed_set_lacks():
    """The README trains with `--data guardloop/core/seed/emergency_preparedness.jsonl`: it must load with the
    project's reader, hold only emergency-situation posts, and teach something new (no text repeats the seed set's
    train or eval files, which would also leak into the gate's seed eval)."""
    loaded = load_examples([SEED_DIR / "emergency_preparedness.jsonl"])
    assert loaded.bad_rows == [] and len(loaded.examples) == 50
    assert {example.label for example in loaded.examples} == {"emergency-situation"}
    texts = [example.text.casefold() for example in loaded.examples]
    assert len(set(texts)) == len(texts)
    seed = load_examples([SEED_DIR / "train.jsonl", SEED_DIR / "eval.jsonl"]).examples
    assert not set(texts) & {example.text.casefold() for example in seed}
