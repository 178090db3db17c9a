"""One loop: `simulate` and the production cycle run the same step functions (trainer/steps.py).

Every step function is wrapped with a recorder, then a tiny real cycle (SQLite pool, oracle, registry) and a
tiny real simulation (in-memory pool, oracle, no registry) run. Both must have gone through the shared steps;
a simulation that picked, labeled, trained or evaluated with code of its own would not show up in the record.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.trainer import steps
from guardloop.trainer.cycle import CycleRunner, OracleLabeler
from guardloop.trainer.finetune import FineTuneConfig
from guardloop.trainer.simulate import Simulation, llm_variation_maker
from guardloop.trainer.variations import VariationConfig, VariationGenerator

from guardloop.core.datafiles import Example, load_examples
from guardloop.core.settings import Settings
from guardloop.storage import Database
from guardloop.storage.cycles import PROMOTED
from tests.conftest import free_port
from tests.test_cycle import POOL_TEXTS, cycle_env  # noqa: F401  (the tiny cycle's fixture)
from tests.tiny_onnx import publish_tiny

STEP_FUNCTIONS = (
    "snapshot", "embed", "score", "select", "predicted_counts", "label", "check_labels", "variation_budgets",
    "generate", "build", "train", "open_candidate", "predict", "gate_set", "gate", "publish",
)  # fmt: skip
# What only a database or a registry has: the simulation has no pool table to snapshot and nothing to publish.
CYCLE_ONLY = {"snapshot", "predicted_counts", "publish"}


def dead_llm(proba: Any = None) -> VariationGenerator:
    """An LLM endpoint nothing listens on: the variations step runs and records every item as failed."""
    return VariationGenerator(
        VariationConfig(retries=1, backoff=0.01, timeout=2),
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        model="any",
        api_key="unused",
        predict_proba=proba,
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    record: list[str] = []
    for name in STEP_FUNCTIONS:
        original = getattr(steps, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            record.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(steps, name, functools.wraps(original)(spy))
    return record


@pytest.mark.slow
def test_simulate_and_the_cycle_call_the_same_step_functions(
    cycle_env: tuple[Settings, Database, Path],  # noqa: F811  (the fixture imported above)
    calls: list[str],
) -> None:
    settings, database, oracle_file = cycle_env
    # A one-epoch model on a slice: this test is about which code runs, the gate has its own tests.
    settings = settings.model_copy(update={"gate_max_macro_f1_drop": 1.0, "gate_max_recall_drop": 1.0})
    registry = ModelRegistry(settings.registry_dir)
    publish_tiny(registry, settings.data_dir, favour="legal-advice")
    runner = CycleRunner(
        settings=settings,
        database=database,
        registry=registry,
        oracle=OracleLabeler(oracle_file),
        variation_generator=dead_llm,
    )
    assert runner.run().status == PROMOTED
    cycle_calls = set(calls)
    calls.clear()

    seed = load_examples(settings.train_data).examples
    pool = [Example(text, label) for text, label in POOL_TEXTS.items()]
    simulation = Simulation(
        pool=pool,
        seed_data=seed[::2],
        dev=seed[1::4],
        eval_data=seed[3::4],
        strategy=settings.cycle_strategy,
        iterations=1,
        per_iteration=6,
        make_variations=llm_variation_maker(dead_llm()),
        cache_dir=settings.data_dir / "cache",
        config=FineTuneConfig(seed=1, epochs=1),
    )
    result = simulation.run()
    simulate_calls = set(calls)

    assert sum(result.iterations[0].acquired.values()) == 6  # the oracle answered every pick
    assert cycle_calls == set(STEP_FUNCTIONS)
    assert simulate_calls == set(STEP_FUNCTIONS) - CYCLE_ONLY
