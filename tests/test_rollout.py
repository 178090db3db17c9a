"""Roll-out of a new version: shadow scoring and canary with automatic rollback, on two real service instances
(two uvicorn servers on loopback) sharing one PostgreSQL database and one registry, with tiny real ONNX models."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import onnx
import pytest
from guardloop.models.registry import ModelRegistry, RegistryError
from guardloop.models.rollout import Rollouts, RolloutState, routed_to_canary
from guardloop.trainer.rollout_step import advance_rollout
from onnx import numpy_helper

from guardloop.core.labels import LABELS
from guardloop.core.rollout_judgement import CanaryBounds, canary_problem, judge_shadow
from guardloop.core.settings import Settings
from guardloop.storage import Database, ReviewRepository
from guardloop.storage.rollout_tallies import RolloutRepository
from tests.conftest import live_server, wait_for
from tests.tiny_onnx import publish_dir, publish_tiny, write_tiny_model

TEXTS = [f"customer message {i}: question about order {i * 7} and the weather in town {i % 13}" for i in range(60)]


def write_leaning_model(out_dir: Path, label: str, bias: float) -> Path:
    """The seed-0 tiny model with a small bias towards `label`: it agrees with the plain one except where it moves
    a text to `label` (about a quarter of TEXTS at 0.5), so it disagrees on that one class only."""
    write_tiny_model(out_dir, seed=0)
    model = onnx.load(out_dir / "model.onnx")
    for initializer in model.graph.initializer:
        if initializer.name == "bias":
            values = numpy_helper.to_array(initializer).copy()
            values[LABELS.index(label)] = bias
            initializer.CopyFrom(numpy_helper.from_array(values, "bias"))
    onnx.save(model, out_dir / "model.onnx")
    return out_dir


def replica_settings(registry: ModelRegistry, database_url: str, data_dir: Path, **overrides) -> Settings:
    return Settings(
        registry_dir=registry.root,
        data_dir=data_dir,
        database_url=database_url,
        registry_poll_seconds=0.2,
        rollout_check_seconds=0.2,
        pool_sample_rate=0.0,  # the pool gets only what the test is about
        pool_uncertainty_threshold=1.0,
        pool_flush_seconds=0.1,
        **overrides,
    )


def current(url: str) -> dict:
    return httpx.get(f"{url}/models/current", timeout=10).json()


# ----------------------------------------------------------------------------- the registry's roll-out state
def test_rollout_state_moves_through_its_stages_atomically(tmp_path: Path, registry: ModelRegistry):
    base = publish_tiny(registry, tmp_path, seed=0)
    candidate = publish_tiny(registry, tmp_path, seed=1, make_current=False)
    other = publish_tiny(registry, tmp_path, seed=2, make_current=False)
    rollouts = Rollouts(registry)
    with pytest.raises(RegistryError, match="already current"):
        rollouts.start_shadow(base)
    assert rollouts.start_shadow(candidate).key == "shadow"
    with pytest.raises(RegistryError, match="complete or abort it first"):
        rollouts.start_canary(other, 0.1)
    assert rollouts.start_canary(candidate, 0.25).key == "canary@0.25"
    assert rollouts.start_canary(candidate, 0.5).baseline == base
    assert registry.current() == base  # nothing moves `current` until the roll-out completes
    assert rollouts.complete() == candidate
    assert registry.current() == candidate and rollouts.state() is None
    assert [event.event for event in rollouts.events()] == ["shadow", "canary", "raise", "complete"]
    assert not list(registry.root.glob(".rollout.tmp-*"))


def test_canary_routing_is_stable_per_client_and_close_to_its_share():
    state = RolloutState(candidate="v2", baseline="v1", stage="canary", share=0.25, since="2026-11-29T00:00:00Z")
    clients = [f"ip:10.0.{i // 250}.{i % 250}" for i in range(4000)]
    chosen = [routed_to_canary(state, client) for client in clients]
    assert chosen == [routed_to_canary(state, client) for client in clients]  # the same answer every time
    assert 0.22 < sum(chosen) / len(chosen) < 0.28
    raised = state.model_copy(update={"share": 0.5})
    assert all(routed_to_canary(raised, client) for client, was in zip(clients, chosen, strict=True) if was)


def test_judgements():
    per_class = {label: {"disagreed": 0, "serving_flagged": 0, "shadow_flagged": 0} for label in LABELS}
    agreeing = {"scored": 600, "disagreed": 6, "per_class": per_class}
    assert judge_shadow(agreeing, min_texts=1000, max_disagreement=0.05).action == "wait"
    assert judge_shadow(agreeing, min_texts=500, max_disagreement=0.05).action == "promote"
    leaning = {**agreeing, "disagreed": 120, "per_class": {**per_class, "self-harm": {"disagreed": 120}}}
    assert judge_shadow(leaning, min_texts=500, max_disagreement=0.05).action == "wait"
    settled = {"min_texts": 500, "max_disagreement": 0.05, "min_reviewed": 10}
    assert judge_shadow(leaning, **settled, reviewed_for_candidate=8, reviewed_for_serving=3).action == "promote"
    assert judge_shadow(leaning, **settled, reviewed_for_candidate=3, reviewed_for_serving=8).action == "reject"
    bounds = CanaryBounds(min_requests=20, max_flag_rate_increase=0.05, max_error_rate=0.01, max_latency_ratio=2.0)
    side = {"requests": 20, "errors": 0, "texts": 20, "flagged": 2, "seconds": 0.2}
    assert canary_problem({"canary": side, "stable": side}, bounds) is None
    assert "flag rate" in canary_problem({"canary": {**side, "flagged": 20}, "stable": side}, bounds)
    assert "error rate" in canary_problem({"canary": {**side, "errors": 5}, "stable": side}, bounds)
    assert "ms per request" in canary_problem({"canary": {**side, "seconds": 1.0}, "stable": side}, bounds)


# ----------------------------------------------------------------------------- two replicas, one database
def test_a_shadow_that_disagrees_on_one_class_stays_in_shadow_and_its_disagreements_reach_the_reviewers(
    tmp_path: Path, postgres_url: str
):
    registry = ModelRegistry(tmp_path / "registry")
    serving = publish_dir(registry, write_tiny_model(tmp_path / "serving", seed=0))
    candidate = publish_dir(registry, write_leaning_model(tmp_path / "leaning", "self-harm", 0.5), make_current=False)
    Rollouts(registry).start_shadow(candidate)
    settings = replica_settings(
        registry, postgres_url, tmp_path / "trainer", shadow_min_texts=len(TEXTS), shadow_max_disagreement=0.05
    )
    with ExitStack() as stack:
        urls = [
            stack.enter_context(live_server(replica_settings(registry, postgres_url, tmp_path / f"data-{i}")))
            for i in range(2)
        ]
        assert wait_for(lambda: all(current(url)["rollout"]["loaded"] for url in urls), timeout=20)
        answered = Counter()
        for index, text in enumerate(TEXTS):
            body = httpx.post(f"{urls[index % 2]}/classify", json={"text": text}, timeout=10).json()
            answered[body["model_version"]] += 1  # the shadow answers nothing
        assert answered == {serving: len(TEXTS)}
        database = Database(postgres_url)
        tallies = RolloutRepository(database)
        assert wait_for(lambda: tallies.totals(candidate, "shadow").get("scored") == len(TEXTS), timeout=20)
    counts = tallies.totals(candidate, "shadow")
    moved = counts["per_class"]["self-harm"]["disagreed"]
    assert counts["disagreed"] == moved > len(TEXTS) * 0.1  # every disagreement is about self-harm
    queue = ReviewRepository(database).queue("alice", limit=100)
    assert len(queue) == moved
    assert {(item.request_reason["shadow"], item.request_reason["shadow_label"], item.priority) for item in queue} == {
        (candidate, "self-harm", settings.shadow_review_priority)
    }
    step = advance_rollout(settings, registry, database)
    assert step.action == "wait" and "self-harm" in step.reason
    assert Rollouts(registry).state().stage == "shadow" and registry.current() == serving
    database.dispose()


def test_a_bad_canary_is_rolled_back_automatically_while_every_request_succeeds(tmp_path: Path, postgres_url: str):
    registry = ModelRegistry(tmp_path / "registry")
    serving = publish_dir(registry, write_tiny_model(tmp_path / "serving", seed=0))
    flags_everything = publish_tiny(registry, tmp_path, favour="self-harm", make_current=False)
    window = 10.0  # seconds from the canary's start to its halt on both replicas, generous for a loaded machine
    overrides = {"canary_min_requests": 10, "canary_by": "request"}
    settings = replica_settings(registry, postgres_url, tmp_path / "trainer", **overrides)
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                live_server(replica_settings(registry, postgres_url, tmp_path / f"data-{i}", **overrides))
            )
            for i in range(2)
        ]
        Rollouts(registry).start_canary(flags_everything, 0.5, by="request")
        assert wait_for(lambda: all(current(url)["rollout"]["loaded"] for url in urls), timeout=20)
        started = time.monotonic()
        statuses, answered_by = Counter(), Counter()
        index = 0
        while time.monotonic() - started < window and not all(current(url)["rollout"]["halted"] for url in urls):
            response = httpx.post(f"{urls[index % 2]}/classify", json={"text": TEXTS[index % len(TEXTS)]}, timeout=10)
            statuses[response.status_code] += 1
            answered_by[response.json()["model_version"]] += 1
            index += 1
        halted_after = time.monotonic() - started
        assert halted_after < window, f"canary still routed after {window} s"
        assert set(statuses) == {200}  # no request failed
        assert answered_by[flags_everything] > 0  # it did answer some, before it was halted
        reason = current(urls[0])["rollout"]["halted"]
        assert "flag rate" in reason
        after = [httpx.post(f"{urls[i % 2]}/classify", json={"text": TEXTS[i]}, timeout=10).json() for i in range(20)]
        assert {body["model_version"] for body in after} == {serving}  # every replica dropped the canary
    database = Database(postgres_url)
    step = advance_rollout(settings, registry, database)  # the trainer records the rollback in the registry
    assert step.action == "abort" and "flag rate" in step.reason
    assert Rollouts(registry).state() is None and registry.current() == serving
    database.dispose()
