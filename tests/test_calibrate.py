"""Per-category threshold calibration: the rule, the targets, and `guardloop calibrate` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.calibrate import CalibrationError, Target, calibrate_thresholds, parse_targets

from guardloop.core.labels import HARMFUL_LABELS, LABELS
from tests.test_cli import assert_one_line_error, run_cli
from tests.tiny_onnx import publish_tiny

# ------------------------------------------------------------------------------------------ the rule


def probs_with(label: str, scores: list[float]) -> np.ndarray:
    """Rows whose `label` column holds `scores` (other columns fill the rest; they do not matter here)."""
    rows = np.full((len(scores), len(LABELS)), 0.0)
    rows[:, LABELS.index(label)] = scores
    rows[:, LABELS.index("not-harmful")] = 1 - np.asarray(scores)
    return rows


SCORES = [0.9, 0.8, 0.6, 0.4, 0.2]
TRUTH = ["self-harm", "not-harmful", "self-harm", "self-harm", "not-harmful"]


def calibrate_self_harm(target: Target, scores=SCORES, truth=TRUTH):
    (result,) = calibrate_thresholds(probs_with("self-harm", scores), truth, {"self-harm": 0.5}, {"self-harm": target})
    return result


def test_target_precision_picks_the_lowest_threshold_that_reaches_it():
    # precision at 0.9: 1/1, at 0.8: 1/2, at 0.6: 2/3, at 0.4: 3/4, at 0.2: 3/5
    result = calibrate_self_harm(Target("precision", 0.7))
    assert result.reached
    assert result.threshold == pytest.approx(0.4)
    assert result.precision == pytest.approx(0.75)
    assert result.recall == pytest.approx(1.0)


def test_target_precision_one_keeps_only_the_top():
    result = calibrate_self_harm(Target("precision", 1.0))
    assert result.threshold == pytest.approx(0.9)
    assert result.recall == pytest.approx(1 / 3)


def test_target_recall_picks_the_highest_threshold_that_reaches_it():
    result = calibrate_self_harm(Target("recall", 0.6))
    assert result.threshold == pytest.approx(0.6)  # 2 of 3 self-harm texts score >= 0.6
    assert result.recall == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(2 / 3)
    assert calibrate_self_harm(Target("recall", 1.0)).threshold == pytest.approx(0.4)


def test_an_unreachable_target_keeps_the_old_threshold():
    result = calibrate_self_harm(Target("precision", 0.9), truth=["not-harmful", "self-harm", "self-harm"] + ["x"] * 2)
    assert not result.reached
    assert result.threshold == 0.5
    assert "no threshold reaches precision 0.9" in result.note


def test_a_category_without_examples_keeps_its_threshold():
    result = calibrate_self_harm(Target("recall", 0.9), truth=["not-harmful"] * 5)
    assert not result.reached
    assert result.threshold == 0.5
    assert result.support == 0
    assert "no example labeled self-harm" in result.note


# ------------------------------------------------------------------------------------------ targets


def test_a_bare_number_targets_every_harmful_category():
    targets = parse_targets(["0.9"], [])
    assert targets == dict.fromkeys(HARMFUL_LABELS, Target("precision", 0.9))


def test_named_targets_override_the_bare_number_and_may_mix_metrics():
    targets = parse_targets(["0.8"], ["self_harm=0.95"])
    assert targets["self-harm"] == Target("recall", 0.95)
    assert targets["legal-advice"] == Target("precision", 0.8)


def test_named_targets_alone_leave_other_categories_out():
    assert parse_targets([], ["emergency=0.99"]) == {"emergency-situation": Target("recall", 0.99)}


@pytest.mark.parametrize(
    ("precision", "recall", "fragment"),
    [
        ([], [], "give --target-precision"),
        (["0.9"], ["0.9"], "at most once"),
        (["1.5"], [], "(0, 1]"),
        (["0"], [], "(0, 1]"),
        (["high"], [], "expected a number"),
        (["weather=0.9"], [], "unknown label 'weather'"),
        (["not-harmful=0.9"], [], "never flagged"),
        (["self-harm=0.9"], ["self-harm=0.9"], "two targets"),
    ],
)
def test_bad_targets_say_what_to_fix(precision, recall, fragment):
    with pytest.raises(CalibrationError) as raised:
        parse_targets(precision, recall)
    assert fragment in str(raised.value)


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}


WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "paper",
    "window",
    "garden",
    "silver",
    "candle",
    "forest",
    "music",
    "orange",
    "winter",
    "bridge",
]


@pytest.fixture
def labeled_file(tmp_path: Path) -> Path:
    """60 texts, 10 per label, of arbitrary words: the tiny random model scores them all differently."""
    rng = np.random.default_rng(7)
    lines = ["text\tlabel"]
    for label in LABELS:
        for _ in range(10):
            lines.append(" ".join(rng.choice(WORDS, size=5)) + f"\t{label}")
    path = tmp_path / "calibration.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def served_flags(registry: ModelRegistry, version: str, path: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """What the service would flag with `version`'s card: labels of the file and each text's flagged categories."""
    card = registry.card(version)
    classifier = OnnxClassifier(registry.path(version), version=version, thresholds=card.thresholds)
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    verdicts = classifier.classify([text for text, _ in rows])
    return [label for _, label in rows], [v.flagged_categories for v in verdicts]


def precision_recall(truth: list[str], flags: list[tuple[str, ...]], label: str) -> tuple[float, float]:
    flagged = [label in f for f in flags]
    true_positives = sum(f and t == label for f, t in zip(flagged, truth, strict=True))
    precision = true_positives / sum(flagged) if any(flagged) else 1.0
    return precision, true_positives / truth.count(label)


def test_calibrate_for_recall_publishes_a_new_current_version_that_reaches_it(tmp_path, cli_env, labeled_file):
    registry = ModelRegistry(tmp_path / "registry")
    old = publish_tiny(registry, tmp_path, seed=3)
    old_card = registry.card(old)
    truth, flags = served_flags(registry, old, labeled_file)
    assert any(precision_recall(truth, flags, label)[1] < 1.0 for label in HARMFUL_LABELS)  # not yet at recall 1

    result = run_cli("calibrate", "--data", str(labeled_file), "--target-recall", "1.0", env=cli_env)
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip().splitlines()[-1]
    assert registry.current() == new != old
    card = registry.card(new)
    assert card.parent == old
    assert card.thresholds != old_card.thresholds
    assert card.thresholds["not-harmful"] == old_card.thresholds["not-harmful"]
    assert registry.card(old) == old_card  # the calibrated version is a new one; the old stays as it was
    assert (registry.path(new) / "model.onnx").read_bytes() == (registry.path(old) / "model.onnx").read_bytes()
    calibration = card.metrics["calibration"]
    assert calibration["from_version"] == old and calibration["n"] == 60
    assert calibration["data"][str(labeled_file)].startswith("sha256:")

    truth, flags = served_flags(registry, new, labeled_file)
    for label in HARMFUL_LABELS:
        assert precision_recall(truth, flags, label)[1] == 1.0, label
        # and the highest such threshold: exactly the lowest score among this label's texts
        scores = OnnxClassifier(registry.path(new), version=new).predict_proba(
            [line.split("\t")[0] for line in labeled_file.read_text(encoding="utf-8").splitlines()[1:]]
        )[:, LABELS.index(label)]
        positives = scores[np.array(truth) == label]
        assert card.thresholds[label] == pytest.approx(float(positives.min()))


def test_calibrate_for_precision_on_one_category_reaches_it_and_keeps_the_others(tmp_path, cli_env, labeled_file):
    registry = ModelRegistry(tmp_path / "registry")
    old = publish_tiny(registry, tmp_path, seed=3)
    texts = [line.split("\t")[0] for line in labeled_file.read_text(encoding="utf-8").splitlines()[1:]]
    truth = [line.split("\t")[1] for line in labeled_file.read_text(encoding="utf-8").splitlines()[1:]]
    scores = OnnxClassifier(registry.path(old), version=old).predict_proba(texts)[:, LABELS.index("legal-advice")]

    # Brute force over every candidate threshold: the lowest one whose precision is >= 0.5.
    def precision_at(threshold: float) -> float:
        flagged = scores >= threshold
        return float((flagged & (np.array(truth) == "legal-advice")).sum() / flagged.sum())

    expected = min(float(t) for t in np.unique(scores) if precision_at(float(t)) >= 0.5)

    result = run_cli("calibrate", "--data", str(labeled_file), "--target-precision", "legal-advice=0.5", env=cli_env)
    assert result.returncode == 0, result.stderr
    new = registry.current()
    card = registry.card(new)
    assert card.thresholds["legal-advice"] == pytest.approx(expected)
    assert {k: v for k, v in card.thresholds.items() if k != "legal-advice"} == {
        k: v for k, v in registry.card(old).thresholds.items() if k != "legal-advice"
    }
    truth_served, flags = served_flags(registry, new, labeled_file)
    assert precision_recall(truth_served, flags, "legal-advice")[0] >= 0.5
    assert "legal-advice" in result.stdout and "precision 0.5" in result.stdout


def test_calibrate_a_named_version_without_promoting(tmp_path, cli_env, labeled_file):
    registry = ModelRegistry(tmp_path / "registry")
    first = publish_tiny(registry, tmp_path, seed=3)
    second = publish_tiny(registry, tmp_path, seed=4)
    result = run_cli(
        "calibrate",
        "--data",
        str(labeled_file),
        "--target-recall",
        "0.9",
        "--model",
        first,
        "--no-promote",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip().splitlines()[-1]
    assert registry.current() == second
    assert registry.card(new).parent == first


def test_calibrate_user_errors_are_one_line(tmp_path, cli_env, labeled_file):
    assert_one_line_error(run_cli("calibrate", "--data", str(labeled_file), env=cli_env), "--target-precision")
    assert_one_line_error(
        run_cli("calibrate", "--data", str(labeled_file), "--target-recall", "2", env=cli_env), "(0, 1]"
    )
    assert_one_line_error(
        run_cli("calibrate", "--data", str(labeled_file), "--target-recall", "0.9", env=cli_env), "no current model"
    )
    registry = ModelRegistry(tmp_path / "registry")
    publish_tiny(registry, tmp_path)
    assert_one_line_error(
        run_cli("calibrate", "--data", str(tmp_path / "missing.tsv"), "--target-recall", "0.9", env=cli_env),
        "missing.tsv",
    )
    assert_one_line_error(
        run_cli("calibrate", "--data", str(labeled_file), "--target-recall", "0.9", "--model", "v-nope", env=cli_env),
        "v-nope",
    )


def test_calibrate_publishes_nothing_when_no_target_is_reached(tmp_path, cli_env):
    registry = ModelRegistry(tmp_path / "registry")
    old = publish_tiny(registry, tmp_path)
    data = tmp_path / "only-safe.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"hello {i}", "label": "not-harmful"}) for i in range(5)) + "\n")
    result = run_cli("calibrate", "--data", str(data), "--target-recall", "0.9", env=cli_env)
    assert result.returncode == 2
    assert "error: no threshold was calibrated" in result.stderr
    assert "no example labeled self-harm" in result.stderr
    assert registry.versions() == [old]
