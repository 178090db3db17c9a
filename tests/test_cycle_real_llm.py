"""Whole cycles with the real embedded SmolLM2 server writing variations and the gate at its default settings.

The current model is trained (for real) on three well-separated seed classes, financial-advice not among them,
so it cannot recognise financial questions (three classes, not six: a model trained within a test's minutes is
good enough to be compared fairly on them). The pool holds unlabeled financial questions. With an oracle that
labels them correctly, the candidate learns the missing class and the default gate promotes it.

A second cycle then starts from that promoted model, which knows the class: its oracle files the same
questions under legal-advice. The candidate it trains unlearns financial-advice, and the gate at its default rule
rejects it with the paired interval in its reason; the promoted model stays current. (A current model trained
within the test's minutes on three classes underfits, so wrong labels against it alone stay within the gate's
noise; the promoted model is the one whose knowledge a wrong cycle can measurably destroy. The gate's rule itself,
item by item, is tested in tests/test_gate.py.)
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.cycle import build_cycle_runner
from guardloop.trainer.train import train_bootstrap_model

from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from guardloop.core.settings import Settings
from guardloop.storage import Database, PoolRecord, PoolRepository
from guardloop.storage.cycles import PROMOTED, REJECTED

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # the test machine's cores are shared (the LLM server takes its own one thread)

MISSING = "financial-advice"
# A class the base data lacks, as financial-advice is: the deficit budget asks the LLM for its variations (a class
# already as large as the largest gets none).
WRONG = "legal-advice"
KNOWN = ("not-harmful", "emergency-situation", "self-harm")
EVAL_LABELS = (MISSING, "emergency-situation", "not-harmful")
POOL_SIZE = 10


def seed_rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (SEED_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Files shared by both cycles, and a registry whose current model never saw a financial question."""
    root = tmp_path_factory.mktemp("world")
    train = seed_rows("train.jsonl")
    base = write_jsonl(root / "base.jsonl", [row for row in train if row["label"] in KNOWN][::2])
    pool = [row["text"] for row in train if row["label"] == MISSING][:POOL_SIZE]
    gate_rows = [row for row in seed_rows("eval.jsonl") if row["label"] in EVAL_LABELS]
    evaluation = write_jsonl(root / "eval.jsonl", gate_rows)
    settings = world_settings(root, base, evaluation)
    version = train_bootstrap_model(settings, ModelRegistry(settings.registry_dir), progress=False)
    return {"root": root, "base": base, "eval": evaluation, "pool": pool, "current": version}


def fill_pool(database: Database, texts: list[str]) -> None:
    """Texts as the service logs them: unrequested pool items the cycle's snapshot will find."""
    database.ensure_schema()
    now = datetime.now(UTC)
    uniform = dict.fromkeys(LABELS, 1 / 6)
    PoolRepository(database).write_batch(
        [
            PoolRecord(text, "not-harmful", uniform, 1.0, 0.0, "v-old", "uncertain", None, now - timedelta(seconds=i))
            for i, text in enumerate(texts)
        ]
    )


def world_settings(root: Path, base: Path, evaluation: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=root / "data",
        registry_dir=root / "registry",
        database_url=f"sqlite:///{root / 'data' / 'guardloop.db'}",
        train_data=[base],
        eval_data=evaluation,
        cycle_budget=POOL_SIZE,
        cycle_epochs=6,
        cycle_label_deadline_hours=1,
        llm_variations=2,
        llm_max_tokens=96,
        # gate_max_macro_f1_drop, gate_max_recall_drop, llm_consistency_threshold, llm_variation_budget: the defaults
        **overrides,
    )


def run_cycle(world: dict, tmp_path: Path, oracle_label: str, registry_from: Path | None = None, **overrides: object):
    """One cycle in a fresh database, from a copy of `registry_from` (default: the world's registry)."""
    settings = world_settings(tmp_path, world["base"], world["eval"], **overrides)
    assert settings.gate_max_macro_f1_drop == 0.01 and settings.gate_max_recall_drop == 0.05
    shutil.copytree(registry_from or world["root"] / "registry", settings.registry_dir)
    (tmp_path / "data").mkdir()
    oracle = tmp_path / "oracle.tsv"
    oracle.write_text("text\tlabel\n" + "".join(f"{text}\t{oracle_label}\n" for text in world["pool"]), "utf-8")
    runner = build_cycle_runner(settings, oracle=oracle)
    fill_pool(runner.database, world["pool"])
    return runner.run(), ModelRegistry(settings.registry_dir)


def llm_answered(cycle) -> dict:
    step = next(step for step in cycle.steps if step["step"] == "generate variations")
    assert "error" not in step, step
    # Gold-reserve items and labels the label check doubted get no variations; every other label is an item.
    withheld = cycle.counts.get("gold_total", 0) + cycle.counts.get("label_check_suspected", 0)
    assert step["items"] == POOL_SIZE - withheld and step["failed_items"] < step["items"], (step, cycle.counts)
    assert step["accepted"] + step["filtered"] > 0, step  # the real LLM wrote lines that were then judged
    # Every rewrite that passed hygiene went through the verifier; what it kept is what the cycle stored.
    assert step["verified"] >= step["accepted"] and step["rejected"] <= step["verified"], step
    return step


@pytest.fixture(scope="module")
def promoted(world: dict, tmp_path_factory: pytest.TempPathFactory):
    """The cycle whose oracle labels the financial questions correctly, and its registry."""
    return run_cycle(world, tmp_path_factory.mktemp("promoted"), MISSING)


def test_a_candidate_that_learns_the_missing_class_is_promoted(world, promoted):
    cycle, registry = promoted

    assert cycle.status == PROMOTED, cycle.reason
    llm_answered(cycle)
    candidate, current = cycle.metrics["candidate"], cycle.metrics["current"]
    assert current["per_class_recall"][MISSING] == 0.0  # the current model never learned the class
    assert candidate["per_class_recall"][MISSING] >= 0.3
    assert candidate["macro_f1"] > current["macro_f1"] + 0.05
    assert f"macro-F1 {candidate['macro_f1']:.4f} vs current {current['macro_f1']:.4f}" in cycle.metrics["gate"]
    assert registry.current() == cycle.model_version != world["current"]
    card = registry.card(cycle.model_version)
    assert card.parent == world["current"]
    # The drift reference is the traffic it learned from (base data and labels), never the LLM's rewrites.
    assert cycle.counts["variations_total"] > 0
    assert card.training["drift_reference_rows"] == cycle.counts["train_size"] - cycle.counts["variations_total"]


def test_a_candidate_taught_wrong_labels_is_rejected_and_the_better_model_keeps_serving(world, promoted, tmp_path):
    first, first_registry = promoted
    assert first.status == PROMOTED, first.reason  # the premise: a current model that knows financial questions

    # This case is about the gate: the first cycle already ran the LLM at its defaults, composing included, so this
    # one asks for rewrites only (composing's extra requests cost the suite about 70 s here and prove nothing new).
    cycle, registry = run_cycle(world, tmp_path, WRONG, registry_from=first_registry.root, llm_compose_examples=0)

    assert cycle.status == REJECTED, cycle.reason
    llm_answered(cycle)
    candidate, current = cycle.metrics["candidate"], cycle.metrics["current"]
    assert current["per_class_recall"][MISSING] >= 0.3
    assert candidate["per_class_recall"][MISSING] < current["per_class_recall"][MISSING]
    # Rejected beyond noise: a drop past its allowance whose paired interval lies above zero, named in the reason.
    assert "paired bootstrap interval [" in cycle.reason, cycle.reason
    drops = cycle.metrics["gate_drops"]
    checked = [("macro-F1", drops["macro_f1"], 0.01)] + [
        (f"{label} recall", entry, 0.05) for label, entry in drops["per_class_recall"].items()
    ]
    rejected_by = [name for name, entry, allowed in checked if entry["drop"] > allowed and entry["low"] > 0]
    assert rejected_by and cycle.reason.split(": ", 1)[1].startswith(rejected_by[0]), (rejected_by, cycle.reason)
    # Nothing was published: the promoted model keeps serving.
    assert registry.current() == first.model_version
    assert registry.versions() == first_registry.versions()
