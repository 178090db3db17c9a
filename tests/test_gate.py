"""The promotion gate (trainer/gate.py) and the gold reserve (trainer/training_set.py).

The gate compares candidate and current model item by item with a paired bootstrap: a drop blocks a candidate
only when it is larger than allowed and its interval lies above zero. The cycle tests run a real cycle on SQLite
with real ONNX models (keyword models: each one's answer per text is known) and a reviewed gold reserve; only the
training step is replaced, by writing the candidate model, because what is tested is what the cycle does with
the candidate it gets (training has its own tests, and a real one takes minutes here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from guardloop.models.registry import ModelCard, ModelRegistry
from guardloop.models.rollout import Rollouts
from guardloop.trainer import steps
from guardloop.trainer.cycle import CycleRunner
from guardloop.trainer.gate import GateRules, gate
from guardloop.trainer.rollout_step import advance_rollout
from guardloop.trainer.training_set import gold_ready, is_gold, split_gold
from typer.testing import CliRunner

from guardloop.cli import app
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from guardloop.core.settings import Settings
from guardloop.storage import Database, LabelRequest, PoolRecord, PoolRepository, ReviewRepository
from guardloop.storage.cycles import AWAITING_LABELS, PROMOTED, REJECTED, SHADOWED, CycleRepository
from guardloop.storage.rollout_tallies import RolloutRepository
from tests.keyword_onnx import publish_keyword_model, write_keyword_model

RULES = GateRules(max_f1_drop=0.01, max_recall_drop=0.05)


def balanced_truth(per_class: int = 20) -> list[str]:
    return [label for label in LABELS for _ in range(per_class)]


def with_errors(truth: list[str], label: str, wrong: int, instead: str = "not-harmful") -> list[str]:
    """`truth` with the first `wrong` items of `label` predicted as `instead`."""
    predicted, left = [], wrong
    for y in truth:
        if y == label and left:
            predicted.append(instead)
            left -= 1
        else:
            predicted.append(y)
    return predicted


# --------------------------------------------------------------------------------------------- the gate
def test_without_a_current_model_the_candidate_is_promoted():
    truth = balanced_truth()
    assert gate(truth, with_errors(truth, "self-harm", 10), None, RULES).promote


def test_a_one_item_difference_is_within_noise():
    """The old rule rejected 'recall 0.85 vs 0.90: drop 0.05' (one item of 20); the interval of a drop this small
    always reaches zero, so it does not decide, and the reason says it was within noise."""
    truth = balanced_truth()
    current = with_errors(truth, "not-harmful", 2, instead="self-harm")
    candidate = with_errors(truth, "not-harmful", 3, instead="self-harm")
    decision = gate(truth, candidate, current, RULES, set_name="eval set")
    assert decision.promote, decision.reason
    assert "within noise: not-harmful recall drop 0.0500" in decision.reason
    entry = decision.drops["per_class_recall"]["not-harmful"]
    assert entry["candidate"] == pytest.approx(0.85) and entry["current"] == pytest.approx(0.90)
    assert entry["low"] <= 0 < entry["high"]


def test_a_clear_recall_drop_is_rejected_with_its_interval():
    truth = balanced_truth()
    decision = gate(truth, with_errors(truth, "self-harm", 10), truth, RULES, set_name="gold reserve")
    assert not decision.promote
    assert decision.reason.startswith("gold reserve (n=120): ")
    # macro-F1 is checked first and falls too; the reason names the drop, its allowance and its interval.
    assert "macro-F1" in decision.reason and "95% paired bootstrap interval [" in decision.reason
    macro = decision.drops["macro_f1"]
    assert 0 < macro["low"] <= macro["drop"] <= macro["high"]
    assert f"[{macro['low']:.4f}, {macro['high']:.4f}]" in decision.reason


def test_a_recall_drop_alone_is_rejected_by_class():
    """A lenient macro-F1 allowance: the rare class's recall still blocks the candidate."""
    truth = balanced_truth()
    rules = GateRules(max_f1_drop=1.0, max_recall_drop=0.05)
    decision = gate(truth, with_errors(truth, "emergency-situation", 8), truth, rules)
    assert not decision.promote
    assert "emergency-situation recall 0.6000 vs current 1.0000: drop 0.4000" in decision.reason


def test_the_decision_is_reproducible():
    truth = balanced_truth()
    candidate, current = with_errors(truth, "self-harm", 4), with_errors(truth, "legal-advice", 1)
    first = gate(truth, candidate, current, RULES)
    assert first == gate(truth, candidate, current, RULES)


# --------------------------------------------------------------------------------------------- the gold reserve
def test_the_gold_reserve_is_a_stable_share_of_item_ids():
    ids = range(1, 20_001)
    reserved = [i for i in ids if is_gold(i, 0.1)]
    assert 0.09 < len(reserved) / len(ids) < 0.11
    assert reserved == [i for i in ids if is_gold(i, 0.1)]  # a pure function of the id: every replica agrees
    assert set(reserved) <= {i for i in ids if is_gold(i, 0.2)}  # a larger share keeps every reserved item
    assert not any(is_gold(i, 0.0) for i in ids)
    trainable, gold = split_gold(list(ids), lambda i: i, 0.1)
    assert gold == reserved and len(trainable) + len(gold) == len(ids)


def test_gold_is_ready_only_with_enough_items_of_every_class():
    assert gold_ready(balanced_truth(3), 3)
    assert not gold_ready(balanced_truth(3)[:-1], 3)  # one class one short
    assert not gold_ready(["self-harm"] * 50, 3)


# --------------------------------------------------------------------------------------------- whole cycles
KEYWORDS = {  # one keyword per class; the current model knows them all
    "self-harm": "hopeless",
    "medical-advice": "doctor",
    "legal-advice": "lawyer",
    "financial-advice": "stocks",
    "emergency-situation": "flood",
    "not-harmful": "garden",
}
PER_CLASS = 10
ODD = "zebra"  # in one gold text only; a candidate may know it


def gold_texts() -> list[tuple[str, str]]:
    items = [(f"{word} item {i}", label) for label, word in KEYWORDS.items() for i in range(PER_CLASS)]
    items[0] = (f"{items[0][0]} {ODD}", items[0][1])  # a self-harm text
    return items


def keyword_map(**overrides: tuple[str, float]) -> dict[str, tuple[str, float]]:
    return {word: (label, 50.0) for label, word in KEYWORDS.items()} | overrides


@pytest.fixture
def gold_cycle(tmp_path: Path) -> tuple[Settings, Database, str]:
    """A cycle waiting for labels on 60 requested items, all reviewed and all in the gold reserve (10 per
    class), and a current keyword model that gets every one of them right."""
    small_train = tmp_path / "train.jsonl"
    lines = (SEED_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()
    small_train.write_text("\n".join(lines[::6]) + "\n", encoding="utf-8")
    small_eval = tmp_path / "eval.jsonl"  # the fixed eval set is scored too: a slice keeps the test fast
    lines = (SEED_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    small_eval.write_text("\n".join(lines[::5]) + "\n", encoding="utf-8")
    settings = Settings(
        data_dir=tmp_path / "data",
        registry_dir=tmp_path / "registry",
        database_url=f"sqlite:///{tmp_path / 'guardloop.db'}",
        train_data=[small_train],
        eval_data=small_eval,
        gold_share=0.999,
        gold_min_per_class=PER_CLASS,
        # The mislabel check has its own tests; here it would only add time, and a label it doubted would leave
        # the gold reserve (withheld until a second look) and change the counts these tests are about.
        label_check=False,
    )
    database = Database(settings.database_url_value)
    database.ensure_schema()
    publish_keyword_model(ModelRegistry(settings.registry_dir), tmp_path, keyword_map())
    items = gold_texts()
    now = datetime.now(UTC)
    uniform = dict.fromkeys(LABELS, 1 / 6)
    pool = PoolRepository(database)
    pool.write_batch(
        [PoolRecord(t, "not-harmful", uniform, 1.0, 0.0, "v-old", "uncertain", None, now) for t, _ in items]
    )
    ids = {item.text: item.id for item in pool.iter_items()}
    assert all(is_gold(i, settings.gold_share) for i in ids.values())  # ids 1..60 at share 0.999
    cycle_id = "c-gold"
    cycles = CycleRepository(database)
    cycles.create(cycle_id, strategy="rare-cluster", budget=len(items), parent_version=None)
    pool.mark_requested([LabelRequest(ids[t], {"cycle_id": cycle_id}) for t, _ in items], at=now)
    cycles.update(cycle_id, status=AWAITING_LABELS, label_deadline=now + timedelta(hours=1))
    reviews = ReviewRepository(database)
    for text, label in items:
        reviews.add_label(ids[text], "alice", label)
    return settings, database, cycle_id


def run_with_candidate(
    settings: Settings, database: Database, keywords: dict[str, tuple[str, float]], monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[str]]:
    """Run the waiting cycle; its training step writes the keyword model `keywords`. Returns the cycle and the
    texts the cycle would have trained on."""
    trained_on: list[str] = []

    def write_candidate(examples, dev, config, work_dir, **kwargs):
        trained_on.extend(ex.text for ex in examples)
        # The operator's base model and teacher (settings) are what training is given.
        assert (kwargs["base_model"], kwargs["teacher"]) == (settings.base_model, settings.teacher)
        staging = write_keyword_model(Path(work_dir) / "staging", keywords)
        card = ModelCard(
            version="unpublished",
            created_at=datetime.now(UTC),
            labels=list(LABELS),
            thresholds=dict.fromkeys(LABELS, 0.5),
            metrics={"dev": None, "onnx_check": {"agreement": 1.0}},
        )
        return staging, card

    monkeypatch.setattr(steps, "train", write_candidate)
    runner = CycleRunner(settings=settings, database=database, registry=ModelRegistry(settings.registry_dir))
    return runner.run(), trained_on


def test_a_candidate_worse_on_the_gold_labels_is_rejected_with_the_interval(gold_cycle, monkeypatch):
    settings, database, cycle_id = gold_cycle
    registry = ModelRegistry(settings.registry_dir)
    old = registry.current()
    # The candidate files every self-harm text under not-harmful: perfect on the seed's own set is not enough.
    worse = keyword_map(hopeless=("not-harmful", 50.0))

    cycle, trained_on = run_with_candidate(settings, database, worse, monkeypatch)

    assert cycle.id == cycle_id and cycle.status == REJECTED
    assert cycle.reason.startswith("gold reserve (n=60): ")
    assert "paired bootstrap interval [" in cycle.reason and "judged on the gold reserve (60 items)" in cycle.reason
    assert registry.current() == old and registry.versions() == [old]
    assert cycle.metrics["gate_set"] == "gold reserve"
    assert cycle.metrics["gate_drops"]["per_class_recall"]["self-harm"]["drop"] == 1.0
    # Both sets' numbers are in the record.
    sets = cycle.metrics["eval_sets"]
    assert sets["gold reserve"]["n"] == 60 and sets["gold reserve"]["per_class"] == dict.fromkeys(LABELS, PER_CLASS)
    assert sets["gold reserve"]["candidate"]["per_class_recall"]["self-harm"] == 0.0
    assert sets["eval set"]["n"] == 24 and sets["eval set"]["current"]["macro_f1"] is not None
    # `guardloop cycles show` prints both sets' numbers and which one decided.
    env = {"GUARDLOOP_DATABASE_URL": settings.database_url_value, "GUARDLOOP_DATA_DIR": str(settings.data_dir)}
    shown = CliRunner().invoke(app, ["cycles", "show", cycle_id], env=env)
    assert shown.exit_code == 0, shown.output
    assert "eval set (n=24): macro-F1 candidate " in shown.stdout
    assert "gold reserve (n=60, 10 of 10 per class in the thinnest): macro-F1 candidate 0." in shown.stdout
    assert shown.stdout.rstrip().endswith("(the gate judged on it)")
    # Training never saw a gold text.
    gold = {text for text, _ in gold_texts()}
    assert trained_on and not gold & set(trained_on)
    assert cycle.counts["gold_total"] == 60 and cycle.counts["human_labels_total"] == 0


def test_a_candidate_one_gold_item_worse_is_not_rejected(gold_cycle, monkeypatch):
    settings, database, _ = gold_cycle
    registry = ModelRegistry(settings.registry_dir)
    # Wrong on exactly one gold text (the self-harm one with the odd word): recall 0.9 vs 1.0, a drop of 0.1
    # where 0.05 is allowed, which the old gate rejected.
    one_off = keyword_map(**{ODD: ("not-harmful", 500.0)})

    cycle, _ = run_with_candidate(settings, database, one_off, monkeypatch)

    assert cycle.status == PROMOTED, cycle.reason
    assert "within noise: " in cycle.reason and "self-harm recall drop 0.1000 [0.0000, " in cycle.reason
    assert registry.current() == cycle.model_version
    assert cycle.metrics["gate_drops"]["per_class_recall"]["self-harm"]["low"] <= 0


def test_before_the_gold_reserve_is_large_enough_the_eval_set_decides(gold_cycle, monkeypatch, tmp_path):
    settings, database, _ = gold_cycle
    base = tmp_path / "operator-encoder"
    base.mkdir()
    settings = settings.model_copy(update={"gold_min_per_class": PER_CLASS + 1, "base_model": base, "teacher": "mpnet"})

    cycle, _ = run_with_candidate(settings, database, keyword_map(hopeless=("not-harmful", 50.0)), monkeypatch)

    assert cycle.metrics["gate_set"] == "eval set"
    assert "gold reserve has 60 items, below 11 of every class: judged on eval set" in cycle.reason
    # Still recorded beside the set that decided.
    assert cycle.metrics["eval_sets"]["gold reserve"]["candidate"]["per_class_recall"]["self-harm"] == 0.0


@pytest.mark.parametrize("ending", ["complete", "abort"])
def test_a_candidate_rolled_out_in_shadow_is_promoted_only_when_its_roll_out_completes(gold_cycle, monkeypatch, ending):
    settings, database, _ = gold_cycle
    settings = settings.model_copy(update={"rollout_shadow": True, "canary_steps": [1.0], "canary_min_requests": 5})
    registry = ModelRegistry(settings.registry_dir)
    old = registry.current()

    cycle, _ = run_with_candidate(settings, database, keyword_map(**{ODD: ("not-harmful", 500.0)}), monkeypatch)

    # It passed the gate, but serves no one yet: the record says so, and the current model stays.
    assert cycle.status == SHADOWED and cycle.finished_at is not None, cycle.reason
    candidate = cycle.model_version
    assert registry.current() == old and Rollouts(registry).state().candidate == candidate
    tallies = RolloutRepository(database)
    if ending == "complete":
        Rollouts(registry).start_canary(candidate, 1.0, by="request")
        side = {"requests": 5, "errors": 0, "texts": 5, "flagged": 1, "seconds": 0.05}
        tallies.save_tally(candidate, "canary@1", "replica-a", {"canary": side, "stable": side})
    else:
        tallies.halt(candidate, "shadow", "flag rate up 0.4", "replica-a")
    step = advance_rollout(settings, registry, database)

    assert step.action == ending
    after = CycleRepository(database).get(cycle.id)
    if ending == "complete":
        assert after.status == PROMOTED and "roll-out completed" in after.reason
        assert registry.current() == candidate
    else:
        assert after.status == REJECTED and after.reason.startswith("roll-out aborted: ")
        assert registry.current() == old
    assert [entry["action"] for entry in after.metrics["rollout"]][-1] == ending
