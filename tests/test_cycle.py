"""The active-learning cycle: single-flight, and whole cycles on a real SQLite pool, real training and a
real registry (promoted, rejected, waiting for reviewers, killed mid-way)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.trainer import steps
from guardloop.trainer.cycle import CycleBusy, CycleRunner, OracleLabeler, single_flight
from guardloop.trainer.variations import VariationConfig, VariationGenerator

from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_DIR
from guardloop.core.settings import Settings
from guardloop.storage import Database, PoolRecord, PoolRepository, ReviewRepository
from guardloop.storage.cycles import AWAITING_LABELS, FAILED, PROMOTED, REJECTED, CycleRepository
from tests.conftest import free_port
from tests.tiny_bert import write_tiny_bert
from tests.tiny_onnx import publish_tiny

SEED = SEED_DIR


def test_single_flight_with_sqlite_file_lock(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with single_flight(database, tmp_path), pytest.raises(CycleBusy), single_flight(database, tmp_path):
        pass
    with single_flight(database, tmp_path):  # released after the block
        pass


# --------------------------------------------------------------------------------------------- whole cycles
POOL_TEXTS = {
    "i want to disappear forever and stop being a burden": "self-harm",
    "what dose of ibuprofen is safe for a bad toothache": "medical-advice",
    "can my employer fire me for being pregnant": "legal-advice",
    "should i move my savings into index funds this year": "financial-advice",
    "my neighbour just collapsed and is not breathing": "emergency-situation",
    "what is a good name for a golden retriever puppy": "not-harmful",
    "nobody would notice if i was gone tomorrow": "self-harm",
    "is this rash on my arm something to worry about": "medical-advice",
    "do i need a lawyer to contest a parking ticket": "legal-advice",
    "how much should i keep in an emergency fund": "financial-advice",
    "the kitchen is on fire and smoke is everywhere": "emergency-situation",
    "recommend a sci fi novel for a long flight": "not-harmful",
}


def fill_pool(database: Database, texts: list[str]) -> None:
    database.ensure_schema()
    now = datetime.now(UTC)
    uniform = dict.fromkeys(LABELS, 1 / 6)
    PoolRepository(database).write_batch(
        [
            PoolRecord(text, "not-harmful", uniform, 1.0, 0.0, "v-old", "uncertain", None, now - timedelta(seconds=i))
            for i, text in enumerate(texts)
        ]
    )


@pytest.fixture
def cycle_env(tmp_path: Path):
    small_train = tmp_path / "train.jsonl"
    lines = (SEED / "train.jsonl").read_text(encoding="utf-8").splitlines()
    small_train.write_text("\n".join(lines[::6]) + "\n", encoding="utf-8")
    oracle = tmp_path / "oracle.tsv"
    oracle.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in POOL_TEXTS.items()), encoding="utf-8")
    settings = Settings(
        data_dir=tmp_path / "data",
        registry_dir=tmp_path / "registry",
        database_url=f"sqlite:///{tmp_path / 'data' / 'guardloop.db'}",
        train_data=[small_train],
        cycle_budget=6,
        cycle_epochs=1,
        cycle_label_deadline_hours=1,
    )
    (tmp_path / "data").mkdir()
    database = Database(settings.database_url_value)
    fill_pool(database, list(POOL_TEXTS))
    return settings, database, oracle


def runner_for(settings: Settings, database: Database, oracle: Path | None) -> CycleRunner:
    return CycleRunner(
        settings=settings,
        database=database,
        registry=ModelRegistry(settings.registry_dir),
        oracle=OracleLabeler(oracle) if oracle else None,
    )


@pytest.mark.slow
def test_cycle_with_oracle_labels_trains_gates_and_promotes(cycle_env, tmp_path):
    settings, database, oracle = cycle_env
    registry = ModelRegistry(settings.registry_dir)
    old = publish_tiny(registry, tmp_path, favour="legal-advice")
    # One epoch on a small slice trains a weak model; this test is about the pipeline, the gate has its own tests.
    # Every item asks the LLM (uniform budget), so every item records the failure.
    settings = settings.model_copy(
        update={"gate_max_macro_f1_drop": 1.0, "gate_max_recall_drop": 1.0, "llm_variation_budget": "uniform"}
    )

    runner = runner_for(settings, database, oracle)
    # The LLM endpoint is down (nothing listens on that port): the cycle records it and trains on what it has.
    runner.variation_generator = lambda proba: VariationGenerator(
        VariationConfig(retries=1, backoff=0.01, timeout=2),
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        model="any",
        api_key="unused",
        predict_proba=proba,
    )

    cycle = runner.run()

    assert cycle.status == PROMOTED, cycle.reason
    llm_step = next(step for step in cycle.steps if step["step"] == "generate variations")
    # labels the label check doubted are withheld (no variations either) until a second reviewer answers
    doubted = cycle.counts["label_check_suspected"]
    assert llm_step["items"] == 6 - doubted and llm_step["failed_items"] == 6 - doubted and llm_step["accepted"] == 0
    assert cycle.counts["variations_failed_items"] == 6 - doubted
    assert registry.current() == cycle.model_version != old
    assert registry.card(cycle.model_version).parent == old
    steps = [step["step"] for step in cycle.steps]
    assert steps == [
        "snapshot pool", "embed", "score", "select", "request labels", "collect labels", "check labels",
        "generate variations", "build training set", "train and export", "evaluate", "gate", "publish",
    ]  # fmt: skip
    # Each step's time is its own: together they fit in the cycle's wall time, and training is never free.
    step_seconds = {step["step"]: step["seconds"] for step in cycle.steps}
    assert step_seconds["train and export"] > 0
    assert sum(step_seconds.values()) <= (cycle.finished_at - cycle.started_at).total_seconds() + 1.0
    assert cycle.counts["requested"] == 6 and cycle.counts["labeled"] == 6
    assert set(cycle.metrics["candidate"]["per_class_f1"]) == set(LABELS) and cycle.metrics["current"] is not None
    finals = ReviewRepository(database).final_labels(cycle_id=cycle.id)
    assert {f.label for f in finals} <= set(LABELS) and all(POOL_TEXTS[f.text] == f.label for f in finals)
    assert {f.reviewers[0] for f in finals} == {"oracle"}


@pytest.mark.slow
def test_rejected_candidate_never_becomes_current(cycle_env, tmp_path):
    settings, database, oracle = cycle_env
    registry = ModelRegistry(settings.registry_dir)
    old = publish_tiny(registry, tmp_path, favour="legal-advice")
    # A gate set the current (always legal-advice) model gets perfectly right: any real candidate does worse.
    only_legal = tmp_path / "eval.tsv"
    only_legal.write_text("text\tlabel\n" + "".join(f"legal question {i}\tlegal-advice\n" for i in range(10)))
    settings = settings.model_copy(update={"eval_data": only_legal, "gate_max_recall_drop": 0.0})

    cycle = runner_for(settings, database, oracle).run()

    assert cycle.status == REJECTED
    assert "recall" in cycle.reason or "macro-F1" in cycle.reason
    assert registry.current() == old
    assert registry.versions() == [old]


@pytest.mark.slow
def test_cycle_waits_for_reviewers_then_resumes(cycle_env, tmp_path):
    settings, database, _ = cycle_env
    registry = ModelRegistry(settings.registry_dir)
    publish_tiny(registry, tmp_path, favour="legal-advice")
    runner = runner_for(settings, database, None)

    waiting = runner.run()
    assert waiting.status == AWAITING_LABELS
    queue = ReviewRepository(database).queue("alice", limit=50)
    assert len(queue) == 6 and all(item.request_reason["cycle_id"] == waiting.id for item in queue)
    # The picking model's probabilities travel with the request: the review page explains the pick with them.
    for item in queue:
        assert set(item.request_reason["scores"]) == set(LABELS)
        assert item.request_reason["scored_by"] == registry.current()

    for item in queue[:3]:
        ReviewRepository(database).add_label(item.id, "alice", POOL_TEXTS[item.text])
    still = runner.run()
    assert still.id == waiting.id and still.status == AWAITING_LABELS and still.counts["labeled"] == 3

    after_deadline = datetime.now(UTC) + timedelta(hours=2)
    done = runner.run(now=after_deadline)
    assert done.id == waiting.id
    assert done.status in (PROMOTED, REJECTED)
    assert done.counts["labeled"] == 3


def test_empty_pool_is_skipped_with_a_reason(tmp_path):
    settings = Settings(
        data_dir=tmp_path, registry_dir=tmp_path / "registry", database_url=f"sqlite:///{tmp_path / 'g.db'}"
    )
    cycle = runner_for(settings, Database(settings.database_url_value), None).run()
    assert cycle.status == "skipped" and "no unrequested items" in cycle.reason


@pytest.mark.slow
def test_a_cycle_killed_mid_training_leaves_everything_consistent(cycle_env, tmp_path):
    settings, database, oracle = cycle_env
    registry = ModelRegistry(settings.registry_dir)
    old = publish_tiny(registry, tmp_path, favour="legal-advice")
    env = {
        **os.environ,
        "GUARDLOOP_DATA_DIR": str(settings.data_dir),
        "GUARDLOOP_REGISTRY_DIR": str(settings.registry_dir),
        "GUARDLOOP_DATABASE_URL": settings.database_url_value,
        "GUARDLOOP_TRAIN_DATA": json.dumps([str(p) for p in settings.train_data]),
        "GUARDLOOP_CYCLE_BUDGET": "6",
        "GUARDLOOP_CYCLE_EPOCHS": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "guardloop.cli", "cycle", "--now", "--oracle", str(oracle)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cycles = CycleRepository(database)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        running = cycles.in_progress()
        if running and any(step["step"] == "build training set" for step in running[0].steps):
            break
        assert child.poll() is None, "the cycle ended before it could be killed"
        time.sleep(0.2)
    else:
        pytest.fail("the cycle never reached training")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    assert registry.current() == old and registry.versions() == [old]
    # Nothing half-made in the registry: only the old version and the registry's own bookkeeping files.
    assert sorted(path.name for path in registry.root.iterdir()) == [".lock", "current", "history.jsonl", old]
    killed = cycles.in_progress()[0]

    next_cycle = runner_for(settings, database, oracle).run()
    assert cycles.get(killed.id).status == FAILED
    assert "interrupted" in cycles.get(killed.id).reason
    assert next_cycle.id != killed.id
    # The killed cycle's labels are kept and learned from by the next one.
    assert next_cycle.status in (PROMOTED, REJECTED, "skipped")
    assert len(ReviewRepository(database).final_labels()) >= 6


def test_distillation_texts_are_the_newest_pool_texts_not_trained_on():
    now = datetime.now(UTC)

    class Item:
        def __init__(self, text: str, age: int) -> None:
            self.id, self.text, self.last_seen = age, text, now - timedelta(minutes=age)

    items = [Item("old", 30), Item("labeled", 1), Item("newest", 0), Item("middle", 10)]
    assert steps.distillation_texts(items, ["labeled"], 2) == ["newest", "middle"]
    assert steps.distillation_texts(items, ["labeled"], 10) == ["newest", "middle", "old"]
    assert steps.distillation_texts(iter(()), [], 0) == []


@pytest.mark.slow
@pytest.mark.parametrize("teacher", [True, False])
def test_a_cycle_with_a_teacher_distills_on_its_own_pool(cycle_env, tmp_path, monkeypatch, teacher):
    """With GUARDLOOP_TEACHER the teacher soft-labels the pool's newest texts, never
    a text the student trains on by label or one the gate judges it on (the gold reserve); without a teacher, no
    pool text reaches training. The teacher itself is not trained here
    (its recipe has its own tests): the recorded call goes on to train without it."""
    settings, database, oracle = cycle_env
    publish_tiny(ModelRegistry(settings.registry_dir), tmp_path, favour="legal-advice")
    update = {
        "gate_max_macro_f1_drop": 1.0,
        "gate_max_recall_drop": 1.0,
        "teacher_unlabeled_max": 1000,
        "gold_share": 0.5,
    }
    if teacher:
        update["teacher"] = str(write_tiny_bert(tmp_path / "teacher"))
    settings = settings.model_copy(update=update)
    calls: list[dict] = []
    real_train = steps.train

    def recording_train(examples, dev, config, work_dir, **kwargs):
        calls.append({"texts": {ex.text for ex in examples}, **kwargs})
        return real_train(examples, dev, config, work_dir, **{**kwargs, "teacher": None, "unlabeled": ()})

    monkeypatch.setattr(steps, "train", recording_train)

    cycle = runner_for(settings, database, oracle).run()

    assert cycle.status == PROMOTED, cycle.reason
    (call,) = calls
    step = next(step for step in cycle.steps if step["step"] == "train and export")
    if not teacher:
        assert call["unlabeled"] == [] and step["unlabeled"] == 0
        return
    unlabeled = list(call["unlabeled"])
    assert len(unlabeled) == step["unlabeled"]
    labeled = {f.text for f in ReviewRepository(database).final_labels()}
    gold = labeled - call["texts"]  # labeled, never trained on: the gold reserve
    assert gold, "the test needs a gold reserve"
    unlabeled_by_age = [text for text in POOL_TEXTS if text not in labeled]  # fill_pool: first = newest
    assert unlabeled == unlabeled_by_age  # every pool text nobody labeled, newest first (the limit: test above)
    assert not set(unlabeled) & (call["texts"] | gold)
