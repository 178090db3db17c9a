"""Roll-out of a new version: shadow scoring and canary with automatic rollback, on two real service instances
(two uvicorn servers on loopback) sharing one PostgreSQL database and one registry, with tiny real ONNX models."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
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
from tests.conftest import live_server, temporary_postgres_database, wait_for
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


# One client for the module: HTTP.post() builds a new client (and its TLS context, ~80 ms) on every call.
HTTP = httpx.Client(timeout=10)


def current(url: str) -> dict:
    return HTTP.get(f"{url}/models/current").json()


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
@dataclass
class Fleet:
    registry: ModelRegistry
    database: Database
    urls: list[str]
    serving: str
    settings: Settings  # what the trainer's promote-shadow step runs with
    tmp: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two service instances on one PostgreSQL database and one registry, shared by the tests below (each rolls out
    a candidate of its own and ends its roll-out)."""
    tmp = tmp_path_factory.mktemp("fleet")
    registry = ModelRegistry(tmp / "registry")
    serving = publish_dir(registry, write_tiny_model(tmp / "serving", seed=0))
    # shadow_quiet_ms 0: a copy is scored unless the next request is already in flight (the client waits for each
    # answer, so almost never); with the default 10 ms pause back-to-back requests would leave the shadow nothing.
    overrides = {"canary_min_requests": 10, "canary_by": "request", "shadow_min_texts": 40, "shadow_quiet_ms": 0}
    with temporary_postgres_database() as url, ExitStack() as stack:
        urls = [
            stack.enter_context(live_server(replica_settings(registry, url, tmp / f"data-{i}", **overrides)))
            for i in range(2)
        ]
        database = Database(url)
        stack.callback(database.dispose)
        yield Fleet(
            registry, database, urls, serving, replica_settings(registry, url, tmp / "trainer", **overrides), tmp
        )


def test_a_shadow_that_disagrees_on_one_class_stays_in_shadow_and_its_disagreements_reach_the_reviewers(fleet: Fleet):
    registry, urls = fleet.registry, fleet.urls
    candidate = publish_dir(registry, write_leaning_model(fleet.tmp / "leaning", "self-harm", 0.5), make_current=False)
    Rollouts(registry).start_shadow(candidate)
    assert wait_for(lambda: all((current(url)["rollout"] or {}).get("loaded") for url in urls), timeout=20)
    tallies = RolloutRepository(fleet.database)
    seen = lambda: tallies.totals(candidate, "shadow")  # noqa: E731
    try:
        # A copy is dropped (and counted) while a request is in flight, and the shadow thread runs at the lowest
        # priority: on a busy machine it loses more copies. So rounds of new texts are sent until it has scored
        # enough to be judged (shadow_min_texts), as live traffic would keep coming.
        answered, sent = Counter(), 0
        for round_number in range(8):
            for index, text in enumerate(TEXTS):
                body = HTTP.post(f"{urls[index % 2]}/classify", json={"text": f"{text} (round {round_number})"})
                answered[body.json()["model_version"]] += 1  # the shadow answers nothing
                sent += 1
            assert wait_for(lambda: seen().get("scored", 0) + seen().get("dropped", 0) == sent, timeout=20)  # noqa: B023
            if seen().get("scored", 0) >= fleet.settings.shadow_min_texts:
                break
        assert answered == {fleet.serving: sent}
        counts = seen()
        moved = counts["per_class"]["self-harm"]["disagreed"]
        assert counts["scored"] >= fleet.settings.shadow_min_texts  # each text offered is scored or counted dropped
        assert counts["disagreed"] == moved > counts["scored"] * 0.1  # every disagreement is about self-harm
        reviews = ReviewRepository(fleet.database)
        assert wait_for(lambda: len(reviews.queue("alice", limit=1000)) == moved, timeout=10)  # at the next check
        queue = reviews.queue("alice", limit=1000)
        assert {
            (item.request_reason["shadow"], item.request_reason["shadow_label"], item.priority) for item in queue
        } == {(candidate, "self-harm", fleet.settings.shadow_review_priority)}
        step = advance_rollout(fleet.settings, registry, fleet.database)  # the promote-shadow step
        assert step.action == "wait" and "self-harm" in step.reason
        assert Rollouts(registry).state().stage == "shadow" and registry.current() == fleet.serving
    finally:
        Rollouts(registry).abort(reason="test done")  # the next test rolls out its own candidate


def test_a_bad_canary_is_rolled_back_automatically_while_every_request_succeeds(fleet: Fleet):
    registry, urls = fleet.registry, fleet.urls
    flags_everything = publish_tiny(registry, fleet.tmp, favour="self-harm", make_current=False)
    window = 10.0  # seconds from the canary's start to its halt on both replicas, generous for a loaded machine
    Rollouts(registry).start_canary(flags_everything, 0.5, by="request")
    assert wait_for(lambda: all((current(url)["rollout"] or {}).get("loaded") for url in urls), timeout=20)
    started = time.monotonic()
    statuses, answered_by = Counter(), Counter()
    index = 0
    while time.monotonic() - started < window and not all(current(url)["rollout"]["halted"] for url in urls):
        response = HTTP.post(f"{urls[index % 2]}/classify", json={"text": TEXTS[index % len(TEXTS)]})
        statuses[response.status_code] += 1
        answered_by[response.json()["model_version"]] += 1
        index += 1
    assert time.monotonic() - started < window, f"canary still routed after {window} s"
    assert set(statuses) == {200}  # no request failed
    assert answered_by[flags_everything] > 0  # it did answer some, before it was halted
    assert "flag rate" in current(urls[0])["rollout"]["halted"]
    after = [HTTP.post(f"{urls[i % 2]}/classify", json={"text": TEXTS[i]}).json() for i in range(20)]
    assert {body["model_version"] for body in after} == {fleet.serving}  # every replica dropped the canary
    step = advance_rollout(fleet.settings, registry, fleet.database)  # the trainer records the rollback
    assert step.action == "abort" and "flag rate" in step.reason
    assert Rollouts(registry).state() is None and registry.current() == fleet.serving


# ----------------------------------------------------------------------------- the shadow never waits
def test_the_shadow_drops_and_counts_what_it_cannot_take_without_waiting(tmp_path: Path, registry: ModelRegistry):
    from guardloop.service.model_holder import ModelHolder
    from guardloop.service.shadow import ShadowScorer

    publish_tiny(registry, tmp_path, seed=0)
    Rollouts(registry).start_shadow(publish_tiny(registry, tmp_path, seed=1, make_current=False))
    holder = ModelHolder(registry)
    holder.follow_registry()
    serving, shadow = holder.current, holder.shadow
    verdicts = [serving.classifier.verdict(row) for row in serving.classifier.predict_proba(TEXTS[:4])]
    busy = ShadowScorer(share=1.0, queue_size=8, busy=lambda: True)  # the served model has work waiting
    busy.offer(shadow, serving, TEXTS[:4], TEXTS[:4], verdicts, None)
    assert busy.counts()[shadow.version]["dropped"] == 4 and busy.counts()[shadow.version]["scored"] == 0
    full = ShadowScorer(share=1.0, queue_size=1)  # not started: its queue fills at once
    started = time.perf_counter()
    for _ in range(50):
        full.offer(shadow, serving, TEXTS[:4], TEXTS[:4], verdicts, None)
    assert time.perf_counter() - started < 0.05
    assert full.counts()[shadow.version]["dropped"] == 49 * 4
    sent = []
    scorer = ShadowScorer(share=1.0, queue_size=8, on_disagreements=lambda _, found: sent.extend(found))
    scorer.start()
    scorer.offer(shadow, serving, TEXTS[:4], TEXTS[:4], verdicts, None, store=False)  # a tenant that pools nothing
    scorer.offer(shadow, serving, TEXTS[:4], TEXTS[:4], verdicts, None)
    assert wait_for(lambda: scorer.counts().get(shadow.version, {}).get("scored") == 8, timeout=10)
    scorer.stop()
    disagreed = scorer.counts()[shadow.version]["disagreed"]
    assert disagreed > 0 and len(sent) == disagreed / 2  # counted both times, kept only where the tenant pools


# ----------------------------------------------------------------------------- the CLI
def test_models_canary_and_status_commands(tmp_path: Path, registry: ModelRegistry):
    from typer.testing import CliRunner

    from guardloop.cli import app

    env = {"GUARDLOOP_REGISTRY_DIR": str(registry.root), "GUARDLOOP_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    base = publish_tiny(registry, tmp_path, seed=0)
    result = runner.invoke(app, ["models", "canary"], env=env)
    assert result.exit_code == 2 and "name the VERSION" in result.output
    candidate = publish_tiny(registry, tmp_path, seed=1, make_current=False)
    result = runner.invoke(app, ["models", "canary", candidate, "--share", "0.3", "--by", "request"], env=env)
    assert result.exit_code == 0 and "0.3 of traffic (by request)" in result.output
    result = runner.invoke(app, ["models", "canary", candidate, "--share", "3"], env=env)
    assert result.exit_code == 2 and "must lie in (0, 1]" in result.output
    result = runner.invoke(app, ["models", "status", "--json"], env=env)
    status = json.loads(result.output)
    assert status["current"] == base and status["rollout"]["key"] == "canary@0.3" and status["halted"] is None
    result = runner.invoke(app, ["models", "canary", "--advance"], env=env)
    assert result.exit_code == 0 and result.output.startswith("wait: 0 of 200 canary requests")
    assert runner.invoke(app, ["models", "canary", "--abort"], env=env).exit_code == 0
    assert "roll-out: none" in runner.invoke(app, ["models", "status"], env=env).output
    assert registry.current() == base


def test_the_promote_shadow_step_raises_a_good_canary_step_by_step_then_makes_it_current(
    tmp_path: Path, registry: ModelRegistry
):
    base = publish_tiny(registry, tmp_path, seed=0)
    candidate = publish_tiny(registry, tmp_path, seed=1, make_current=False)
    settings = Settings(
        registry_dir=registry.root, data_dir=tmp_path / "data", canary_steps=[0.1, 1.0], canary_min_requests=5
    )
    database = Database(settings.database_url_value)
    tallies = RolloutRepository(database)
    rollouts = Rollouts(registry)
    rollouts.start_shadow(candidate)
    per_class = {label: {"disagreed": 0, "serving_flagged": 0, "shadow_flagged": 0} for label in LABELS}
    tallies_of = {"scored": 400, "disagreed": 4, "per_class": per_class}
    database.ensure_schema()
    tallies.save_tally(candidate, "shadow", "replica-a", tallies_of)
    tallies.save_tally(candidate, "shadow", "replica-b", tallies_of)  # 800 texts over two replicas
    assert advance_rollout(settings.model_copy(update={"shadow_min_texts": 1000}), registry, database).action == "wait"
    step = advance_rollout(settings.model_copy(update={"shadow_min_texts": 800}), registry, database)
    assert step.action == "canary" and rollouts.state().key == "canary@0.1"
    side = {"requests": 5, "errors": 0, "texts": 5, "flagged": 1, "seconds": 0.05}
    assert advance_rollout(settings, registry, database).action == "wait"  # no canary requests yet
    tallies.save_tally(candidate, "canary@0.1", "replica-a", {"canary": side, "stable": side})
    assert advance_rollout(settings, registry, database).action == "raise" and rollouts.state().share == 1.0
    tallies.save_tally(candidate, "canary@1", "replica-a", {"canary": side, "stable": side})
    assert advance_rollout(settings, registry, database).action == "complete"
    assert registry.current() == candidate and rollouts.state() is None and base in registry.versions()
    database.dispose()
