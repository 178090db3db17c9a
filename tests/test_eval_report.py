"""`guardloop eval`'s critical miss rate, bootstrap intervals and PR curves; `calibrate`'s recall targets for the
critical categories with a precision floor under the others, and the expected numbers it records in the card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.calibrate import CalibrationError, HoldError, Target, calibrate_thresholds, with_hold
from guardloop.trainer.eval_report import bootstrap_f1, critical_misses, flagged_rows
from guardloop.trainer.evaluation import classification_report

from guardloop.core.labels import HARMFUL_LABELS, LABELS
from tests.test_calibrate import WORDS, precision_recall, served_flags
from tests.test_cli import assert_one_line_error, run_cli
from tests.tiny_onnx import publish_tiny, write_tiny_model

SH, MED, EMER, SAFE = (LABELS.index(x) for x in ("self-harm", "medical-advice", "emergency-situation", "not-harmful"))


def row(**scores: float) -> np.ndarray:
    """One probability row: the named columns (underscores for dashes), the rest of the mass on not-harmful."""
    out = np.zeros(len(LABELS))
    for name, value in scores.items():
        out[LABELS.index(name.replace("_", "-"))] = value
    out[SAFE] += 1 - out.sum()
    return out


def test_critical_miss_rate_counts_critical_texts_the_served_rule_flags_as_nothing(tmp_path):
    # self-harm threshold 0.3: a 0.35 self-harm score flags although not-harmful is the top label.
    classifier = OnnxClassifier(
        write_tiny_model(tmp_path / "m"), version="t", thresholds={"self-harm": 0.3, "emergency-situation": 0.6}
    )
    probs = np.array(
        [
            row(self_harm=0.35),  # self-harm, flagged (self-harm, below the top label)
            row(self_harm=0.2, medical_advice=0.7),  # self-harm, flagged as medical-advice only: not a miss
            row(self_harm=0.25),  # self-harm, nothing reaches a threshold: a miss
            row(emergency_situation=0.55),  # emergency, top label but under its 0.6 threshold: a miss
            row(emergency_situation=0.9),  # emergency, flagged
            row(self_harm=0.1),  # not-harmful: never counted
            row(medical_advice=0.2),  # medical-advice, missed, but not critical
        ]
    )
    truth = ["self-harm"] * 3 + ["emergency-situation"] * 2 + ["not-harmful", "medical-advice"]
    flags = flagged_rows(probs, classifier.verdict)
    assert flags == [True, True, False, False, True, False, False]
    misses = critical_misses(truth, flags)
    assert (misses["rate"], misses["missed"], misses["n"]) == (pytest.approx(2 / 5), 2, 5)
    assert misses["per_class"]["self-harm"] == {"rate": pytest.approx(1 / 3), "missed": 1, "n": 3}
    assert misses["per_class"]["emergency-situation"] == {"rate": pytest.approx(1 / 2), "missed": 1, "n": 2}
    assert critical_misses(["not-harmful"], [False])["rate"] is None


def noisy_predictions(n_per_class: int, seed: int = 1) -> tuple[list[str], list[str]]:
    """Predictions right ~75% of the time, wrong toward a random other label otherwise."""
    rng = np.random.default_rng(seed)
    truth = [label for label in LABELS for _ in range(n_per_class)]
    pred = [t if rng.random() < 0.75 else str(rng.choice(LABELS)) for t in truth]
    return truth, pred


def test_bootstrap_interval_holds_the_estimate_is_reproducible_and_narrows_with_data():
    truth, pred = noisy_predictions(20)
    boot = bootstrap_f1(truth, pred, random_state=5)
    report = classification_report(truth, pred)
    assert boot["resamples"] == 1000 and boot["confidence"] == 0.95
    assert boot["macro_f1"]["estimate"] == pytest.approx(report["macro_f1"])
    assert boot["macro_f1"]["low"] < boot["macro_f1"]["estimate"] < boot["macro_f1"]["high"]
    for label in LABELS:
        f1 = boot["per_class_f1"][label]
        assert f1["estimate"] == pytest.approx(report["per_class_f1"][label])
        assert f1["low"] <= f1["estimate"] <= f1["high"], label
    assert bootstrap_f1(truth, pred, random_state=5) == boot
    assert bootstrap_f1(truth, pred, random_state=6)["macro_f1"] != boot["macro_f1"]

    # The same predictions, nine times as many texts: the interval is about three times narrower.
    wide = boot["macro_f1"]["high"] - boot["macro_f1"]["low"]
    big = bootstrap_f1(truth * 9, pred * 9, random_state=5)["macro_f1"]
    assert big["estimate"] == pytest.approx(boot["macro_f1"]["estimate"])
    assert big["high"] - big["low"] < wide / 2


# ------------------------------------------------------------------------------------------ the commands


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {"GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def labeled_file(tmp_path: Path) -> Path:
    """120 texts, 20 per label, of arbitrary words: the tiny random model scores them all differently."""
    rng = np.random.default_rng(11)
    lines = ["text\tlabel"] + [
        " ".join(rng.choice(WORDS, size=5)) + f"\t{label}" for label in LABELS for _ in range(20)
    ]
    path = tmp_path / "labeled.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_eval_prints_critical_misses_and_intervals_and_plots_the_curves(tmp_path, cli_env, labeled_file):
    publish_tiny(ModelRegistry(tmp_path / "registry"), tmp_path, seed=3)
    plot = tmp_path / "pr.png"
    result = run_cli("eval", "--data", str(labeled_file), "--plot", str(plot), env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "confusion matrix" in result.stdout  # the lines that were there stay
    assert "critical miss rate" in result.stdout and "95% bootstrap interval" in result.stdout
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    as_json = run_cli("eval", "--data", str(labeled_file), "--json", "--seed", "4", env=cli_env)
    report = json.loads(as_json.stdout)
    assert report["critical_misses"]["n"] == 40
    assert report["bootstrap"]["random_state"] == 4 and set(report["bootstrap"]["per_class_f1"]) == set(LABELS)
    assert report["bootstrap"]["macro_f1"]["estimate"] == pytest.approx(report["macro_f1"])
    # The miss count agrees with the service's verdicts.
    truth, flags = served_flags(ModelRegistry(tmp_path / "registry"), report["model_version"], labeled_file)
    missed = sum(t in ("self-harm", "emergency-situation") and not f for t, f in zip(truth, flags, strict=True))
    assert report["critical_misses"]["missed"] == missed


def test_eval_plot_into_a_missing_directory_is_one_line(tmp_path, cli_env, labeled_file):
    publish_tiny(ModelRegistry(tmp_path / "registry"), tmp_path)
    result = run_cli("eval", "--data", str(labeled_file), "--plot", str(tmp_path / "nope" / "pr.png"), env=cli_env)
    assert_one_line_error(result, "no such directory", "nope")
    assert_one_line_error(
        run_cli("eval", "--data", str(labeled_file), "--plot", str(tmp_path / "pr.svg"), env=cli_env), ".png"
    )


def test_hold_precision_keeps_a_precise_threshold_and_raises_a_noisy_one():
    # medical-advice scores, one column; at 0.5: flagged 0.9, 0.8, 0.6 -> precision 2/3.
    probs = np.zeros((5, len(LABELS)))
    probs[:, MED] = [0.9, 0.8, 0.6, 0.4, 0.2]
    truth = ["medical-advice", "medical-advice", "not-harmful", "medical-advice", "not-harmful"]
    targets = with_hold({}, 0.6)
    kept = {c.label: c for c in calibrate_thresholds(probs, truth, dict.fromkeys(LABELS, 0.5), targets)}
    assert kept["medical-advice"].threshold == 0.5 and kept["medical-advice"].precision == pytest.approx(2 / 3)
    raised = {c.label: c for c in calibrate_thresholds(probs, truth, dict.fromkeys(LABELS, 0.5), with_hold({}, 0.9))}
    assert raised["medical-advice"].threshold == pytest.approx(0.8)  # the lowest above 0.5 with precision >= 0.9
    # 0.7: 2/3 at 0.5 falls short; raised to 0.8 (1.0), not lowered to 0.4 (3/4), which would reach it too
    assert {c.label: c for c in calibrate_thresholds(probs, truth, dict.fromkeys(LABELS, 0.5), with_hold({}, 0.7))}[
        "medical-advice"
    ].threshold == pytest.approx(0.8)
    truth[0] = "not-harmful"  # now nothing above 0.5 reaches 0.9
    with pytest.raises(HoldError, match="medical-advice"):
        calibrate_thresholds(probs, truth, dict.fromkeys(LABELS, 0.5), with_hold({}, 0.9))
    with pytest.raises(CalibrationError, match="every category has one"):
        with_hold(dict.fromkeys(HARMFUL_LABELS, Target("recall", 0.9)), 0.8)


def test_calibrate_critical_recall_holding_precision_records_what_to_expect(tmp_path, cli_env, labeled_file):
    registry = ModelRegistry(tmp_path / "registry")
    old = publish_tiny(registry, tmp_path, seed=3)
    result = run_cli(
        "calibrate",
        "--data",
        str(labeled_file),
        "--target-recall",
        "self-harm=0.9",
        "--target-recall",
        "emergency-situation=0.8",
        "--hold-precision",
        "0.2",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    new = registry.current()
    assert new != old
    calibration = registry.card(new).metrics["calibration"]
    assert calibration["per_class"]["medical-advice"]["target"] == {"metric": "hold-precision", "value": 0.2}
    expected = calibration["expected"]
    truth, flags = served_flags(registry, new, labeled_file)
    for label in HARMFUL_LABELS:
        precision, recall = precision_recall(truth, flags, label)
        row_ = expected["per_class"][label]
        assert row_["threshold"] == registry.card(new).thresholds[label]
        assert row_["recall"] == pytest.approx(recall), label
        assert (row_["precision"] or 1.0) == pytest.approx(precision), label
        if label not in ("self-harm", "emergency-situation"):
            assert precision >= 0.2, label  # the floor held
    assert expected["per_class"]["self-harm"]["recall"] >= 0.9
    assert expected["per_class"]["emergency-situation"]["recall"] >= 0.8
    also = expected["per_class"]["self-harm"]["also_flags"]
    assert sum(also.values()) == sum("self-harm" in f and t != "self-harm" for t, f in zip(truth, flags, strict=True))
    missed = sum(t in ("self-harm", "emergency-situation") and not f for t, f in zip(truth, flags, strict=True))
    assert expected["critical_misses"]["missed"] == missed
    assert "expected on this file" in result.stdout


def test_calibrate_refuses_when_the_floor_cannot_hold(tmp_path, cli_env, labeled_file):
    registry = ModelRegistry(tmp_path / "registry")
    # Every text scores ~1 medical-advice: 20 of 120 are, so no medical-advice threshold reaches precision 0.5.
    old = publish_tiny(registry, tmp_path, favour="medical-advice")
    result = run_cli(
        "calibrate",
        "--data",
        str(labeled_file),
        "--target-recall",
        "self-harm=0.9",
        "--hold-precision",
        "0.5",
        env=cli_env,
    )
    assert_one_line_error(result, "medical-advice", "--hold-precision 0.5", "nothing published")
    assert registry.versions() == [old]
