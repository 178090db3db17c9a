"""`guardloop simulate`: per-iteration results survive a stopped run; the report averages what all seeds reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guardloop.trainer.simulation_results import IterationResult, append_result_line, read_result_lines, summarize

from guardloop.core.datafiles import load_examples
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from tests.test_cli import assert_one_line_error, run_cli

SEED = SEED_DIR


def iteration(n: int, f1: float, std: float, counts: list[int]) -> IterationResult:
    acquired = dict(zip(LABELS, counts, strict=True))
    return IterationResult(
        iteration=n,
        acquired=acquired,
        acquired_with_variations={label: 6 * c for label, c in acquired.items()},
        std_labels=std,
        std_with_variations=6 * std,
        variations_accepted=5 * sum(counts),
        train_size=150 + 6 * sum(counts),
        eval_macro_f1=f1,
        eval_per_class_f1={label: f1 for label in LABELS},
        seconds=1.0,
    )


def test_report_averages_seeds_only_over_iterations_all_of_them_reached(tmp_path):
    results = tmp_path / "results.jsonl"
    append_result_line(results, "cluster", 13, 0.60, iteration(1, 0.62, 2.0, [4, 4, 4, 4, 2, 2]))
    append_result_line(results, "cluster", 13, 0.60, iteration(2, 0.66, 3.0, [8, 8, 8, 8, 4, 4]))
    append_result_line(results, "cluster", 7, 0.58, iteration(1, 0.64, 4.0, [6, 6, 2, 2, 2, 2]))  # stopped after it 1
    append_result_line(results, "random", 13, 0.60, iteration(1, 0.61, 1.0, [3, 3, 3, 3, 3, 5]))

    lines = read_result_lines(results)
    assert len(lines) == 4 and lines[0]["strategy"] == "cluster" and lines[0]["acquired"]["self-harm"] == 4

    rows = summarize(lines)
    assert [(r["strategy"], r["iteration"], r["seeds"]) for r in rows] == [
        ("cluster", 1, [7, 13]),
        ("random", 1, [13]),
    ]
    cluster = rows[0]
    assert cluster["eval_macro_f1"] == pytest.approx(0.63)
    assert cluster["eval_macro_f1_sd"] == pytest.approx(0.01414, abs=1e-4)  # sample sd of 0.62 and 0.64
    assert cluster["std_labels"] == pytest.approx(3.0)
    assert cluster["baseline_macro_f1"] == pytest.approx(0.59)
    assert cluster["acquired"]["self-harm"] == pytest.approx(5.0)
    assert rows[1]["eval_macro_f1_sd"] == 0.0


def test_report_command_prints_the_table(tmp_path):
    results = tmp_path / "results.jsonl"
    append_result_line(results, "topn", 21, 0.5, iteration(1, 0.7, 2.5, [1, 2, 3, 4, 5, 5]))
    result = run_cli("simulate-report", str(results))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("topn"))
    assert row.split()[:9] == ["topn", "1", "1", "1.0", "2.0", "3.0", "4.0", "5.0", "5.0"]
    assert "70.0" in row and "2.5" in row


def test_report_refuses_missing_and_foreign_files(tmp_path):
    assert_one_line_error(run_cli("simulate-report", str(tmp_path / "nope.jsonl")), "nope.jsonl", "no such file")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"hello": 1}\n', encoding="utf-8")
    assert_one_line_error(run_cli("simulate-report", str(foreign)), "foreign.jsonl", "not a simulate --results file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert_one_line_error(run_cli("simulate-report", str(empty)), "no finished iterations")


def test_simulate_refuses_a_results_file_it_cannot_write_before_training(tmp_path):
    seed = str(SEED / "train.jsonl")
    nowhere = tmp_path / "missing-dir" / "runs.jsonl"
    env = {"GUARDLOOP_DATA_DIR": str(tmp_path / "data")}
    result = run_cli(
        "simulate", "--pool", seed, "--seed-data", seed, "--dev", seed, "--variations", "0",
        "--results", str(nowhere), env=env, timeout=60,
    )  # fmt: skip
    assert_one_line_error(result, "--results", "missing-dir", "cannot append there")
    assert not nowhere.parent.exists()
    assert not (tmp_path / "data").exists()  # nothing started: no caches, no embedder export


@pytest.mark.slow
def test_simulate_writes_each_iteration_as_it_finishes(tmp_path):
    """The real loop (real fine-tuning, oracle labels, no LLM) on a slice of the shipped seed data."""
    train = load_examples([SEED / "train.jsonl"]).examples
    by_label = {label: [ex for ex in train if ex.label == label] for label in LABELS}

    def write(path: Path, rows: list) -> Path:
        path.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in rows), "utf-8")
        return path

    seed_file = write(tmp_path / "seed.jsonl", [ex for rows in by_label.values() for ex in rows[:4]])
    pool_file = write(tmp_path / "pool.jsonl", [ex for rows in by_label.values() for ex in rows[4:24]])
    dev_file = write(tmp_path / "dev.jsonl", [ex for rows in by_label.values() for ex in rows[24:28]])
    results = tmp_path / "results.jsonl"
    env = {
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"),
        "GUARDLOOP_GOLD_SHARE": "0",  # no gold reserve: every label not doubted by the label check trains
    }
    run = run_cli(
        "simulate", "--pool", str(pool_file), "--seed-data", str(seed_file), "--dev", str(dev_file),
        "--strategy", "cluster", "--iterations", "2", "--per-iteration", "6", "--variations", "0",
        "--epochs", "1", "--seed", "3", "--results", str(results),
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = read_result_lines(results)
    assert [line["iteration"] for line in lines] == [1, 2]
    assert [sum(line["acquired"].values()) for line in lines] == [6, 12]  # cumulative oracle labels
    assert all(line["variations_accepted"] == 0 and line["strategy"] == "cluster" for line in lines)
    # a label the check doubts waits one iteration for its second look (the oracle's), then trains
    assert lines[1]["train_size"] == 24 + 12 - lines[1]["labels_suspected"]
    # The file records what the run reported as it went: each iteration's progress line shows the same F1.
    for line in lines:
        assert f"it {line['iteration']}: labels" in run.stderr
        assert f"eval macro-F1 {line['eval_macro_f1']:.4f}" in run.stderr, (line, run.stderr[-2000:])
    assert any(line.startswith("cluster") for line in run.stdout.splitlines())


def test_the_table_names_emergency_f1_the_verifier_share_and_per_class_counts_and_f1(tmp_path):
    results = tmp_path / "results.jsonl"
    for seed, (verified, rejected) in ((1, (40, 10)), (2, (60, 30))):
        it = iteration(1, 0.7, 2.0, [2, 2, 2, 2, 6, 6])
        it.eval_per_class_f1 = {**it.eval_per_class_f1, "emergency-situation": 0.25 * seed}
        it.variations_verified, it.variations_rejected = verified, rejected
        it.variations_composed = 3 * seed
        append_result_line(results, "rare-cluster", seed, 0.6, it)
    old = iteration(1, 0.5, 1.0, [1, 1, 1, 1, 1, 1]).__dict__  # a line written before these fields existed
    newer = ("variations_verified", "variations_rejected", "variations_composed")
    old = {k: v for k, v in old.items() if k not in newer}
    old.pop("acquired_with_variations"), old.pop("eval_per_class_f1")
    with results.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"strategy": "cluster", "seed": 1, "baseline_macro_f1": 0.6, **old}) + "\n")

    rows = summarize(read_result_lines(results))
    rare = next(row for row in rows if row["strategy"] == "rare-cluster")
    assert rare["rejected_share"] == pytest.approx(40 / 100)  # over both seeds' rewrites, not a mean of shares
    assert rare["eval_per_class_f1"]["emergency-situation"] == pytest.approx(0.375)
    assert rare["acquired_with_variations"]["emergency-situation"] == pytest.approx(36.0)

    run = run_cli("simulate-report", str(results))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "emerg F1" in lines[0] and "rejected%" in lines[0]
    first = next(line for line in lines if line.startswith("rare-cluster"))
    assert first.split()[-3:] == ["37.5", "40.0", "4.5"]  # emergency F1, share rejected (%), composed posts
    assert first.split()[-5] == "70.0"  # macro-F1
    assert any("eval F1 per class" in line for line in lines)
    per_class = [line for line in lines if line.startswith("rare-cluster")][1]
    assert per_class.split()[3:9] == ["12.0", "12.0", "12.0", "12.0", "36.0", "36.0"]  # labels + variations
    assert per_class.split()[-2] == "37.5"  # emergency-situation F1 in its column
    old_row = next(line for line in lines if line.startswith("cluster"))
    assert old_row.split()[-3:] == ["-", "-", "-"]  # no per-class F1, verifier share or composed: shown as missing
