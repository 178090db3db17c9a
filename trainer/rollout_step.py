"""The `promote-shadow` step: move the roll-out in the registry one stage on from what the replicas saw.

Run by every cycle before it starts (so by the trainer's timer) and by `guardloop models canary --advance`:

- a halt recorded by a replica (a canary out of bounds): the roll-out is aborted; `current` never moved
- shadow: judged from the shadow tallies of every replica and the reviewers' answers on its disagreements
  (core/rollout_judgement.judge_shadow): promoted to the first canary step, rejected, or left waiting
- canary: judged again over all replicas; within bounds after `canary_min_requests` it is raised to the next
  step of `canary_steps`, and after the last step the candidate becomes `current`

What was decided, and why, is appended to the record of the cycle that produced the candidate (metrics.rollout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from guardloop.models.registry import ModelRegistry, RegistryError
from guardloop.models.rollout import Rollouts, RolloutState

from guardloop.core import trainer_telemetry
from guardloop.core.rollout_judgement import CanaryBounds, canary_problem, judge_shadow, shadow_summary
from guardloop.core.settings import Settings
from guardloop.storage import Database, ReviewRepository
from guardloop.storage.cycles import PROMOTED, REJECTED, SHADOWED, CycleRepository
from guardloop.storage.rollout_tallies import RolloutRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutStep:
    action: str  # none, wait, canary, raise, complete, abort
    reason: str
    candidate: str | None = None
    state: RolloutState | None = None  # after the step
    evidence: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "candidate": self.candidate,
            "stage": self.state.key if self.state else None,
            "evidence": self.evidence,
            "at": datetime.now(UTC).isoformat(),
        }


def bounds_of(settings: Settings) -> CanaryBounds:
    return CanaryBounds(
        min_requests=settings.canary_min_requests,
        max_flag_rate_increase=settings.canary_max_flag_rate_increase,
        max_error_rate=settings.canary_max_error_rate,
        max_latency_ratio=settings.canary_max_latency_ratio,
    )


def advance_rollout(settings: Settings, registry: ModelRegistry, database: Database) -> RolloutStep:
    """Judge the roll-out in progress and move it on (or not); records the step in the candidate's cycle."""
    rollouts = Rollouts(registry)
    state = rollouts.state()
    if state is None:
        return RolloutStep("none", "no roll-out in progress")
    database.ensure_schema()
    tallies = RolloutRepository(database)
    step = _decide(settings, rollouts, tallies, database, state)
    if step.action != "wait":
        log.info("roll-out of %s: %s (%s)", state.candidate, step.action, step.reason)
    _record_in_cycle(registry, database, step)
    return step


def _decide(
    settings: Settings, rollouts: Rollouts, tallies: RolloutRepository, database: Database, state: RolloutState
) -> RolloutStep:
    candidate = state.candidate
    halt = tallies.halt_of(candidate)
    if halt is not None:
        rollouts.abort(reason=f"halted by replica {halt.replica} at {halt.stage}: {halt.reason}")
        return RolloutStep("abort", f"rolled back at {halt.stage}: {halt.reason}", candidate)
    if state.stage == "shadow":
        counts = tallies.totals(candidate, "shadow")
        finals = {final.item_id: final.label for final in ReviewRepository(database).final_labels()}
        for_candidate, for_serving = tallies.reviewed_disagreements(candidate, finals)
        decision = judge_shadow(
            counts,
            min_texts=settings.shadow_min_texts,
            max_disagreement=settings.shadow_max_disagreement,
            reviewed_for_candidate=for_candidate,
            reviewed_for_serving=for_serving,
            min_reviewed=settings.shadow_min_reviewed,
        )
        evidence = {
            **shadow_summary(counts),
            "reviewed_for_candidate": for_candidate,
            "reviewed_for_serving": for_serving,
        }
        if decision.action == "wait":
            return RolloutStep("wait", decision.reason, candidate, state, evidence)
        if decision.action == "reject":
            rollouts.abort(reason=f"shadow rejected: {decision.reason}")
            return RolloutStep("abort", decision.reason, candidate, None, evidence)
        first = settings.canary_steps[0]
        new = rollouts.start_canary(candidate, first, by=settings.canary_by, reason=decision.reason)
        return RolloutStep("canary", f"{decision.reason}; canary at {first:g}", candidate, new, evidence)
    counts = tallies.totals(candidate, state.key)
    problem = canary_problem(counts, bounds_of(settings))
    if problem is not None:
        tallies.halt(candidate, state.key, problem, "trainer")
        rollouts.abort(reason=f"canary out of bounds at {state.key}: {problem}")
        return RolloutStep("abort", problem, candidate, None, counts)
    requests = counts.get("canary", {}).get("requests", 0)
    if requests < settings.canary_min_requests:
        return RolloutStep(
            "wait",
            f"{requests} of {settings.canary_min_requests} canary requests at {state.key}",
            candidate,
            state,
            counts,
        )
    higher = [share for share in settings.canary_steps if share > state.share]
    if not higher:
        rollouts.complete(reason=f"canary within bounds over {requests} requests at {state.key}")
        return RolloutStep(
            "complete", f"within bounds over {requests} requests at {state.key}", candidate, None, counts
        )
    new = rollouts.start_canary(candidate, higher[0], by=state.by, reason=f"within bounds at {state.key}")
    return RolloutStep(
        "raise", f"within bounds over {requests} requests; raised to {higher[0]:g}", candidate, new, counts
    )


def _record_in_cycle(registry: ModelRegistry, database: Database, step: RolloutStep) -> None:
    """Append the step to metrics.rollout of the cycle that made the candidate (a repeated 'wait' replaces the last)."""
    if step.candidate is None:
        return
    try:
        cycle_id = registry.card(step.candidate).metrics.get("cycle")
    except RegistryError:
        return
    cycles = CycleRepository(database)
    cycle = cycles.get(cycle_id) if isinstance(cycle_id, str) else None
    if cycle is None:
        return
    history = list(cycle.metrics.get("rollout") or [])
    if history and history[-1].get("action") == "wait" and step.action == "wait":
        history.pop()
    history.append(step.as_json())
    outcome: dict[str, Any] = {}
    if cycle.status == SHADOWED and step.action == "complete":  # it serves everyone now
        outcome = {"status": PROMOTED, "reason": f"{cycle.reason}; roll-out completed: {step.reason}"}
    elif cycle.status == SHADOWED and step.action == "abort":
        outcome = {"status": REJECTED, "reason": f"roll-out aborted: {step.reason}"}
    cycles.update(cycle.id, metrics={**cycle.metrics, "rollout": history}, **outcome)
    if outcome:
        trainer_telemetry.record_cycle_outcome(outcome["status"])
        if outcome["status"] == PROMOTED and cycle.metrics.get("candidate"):
            trainer_telemetry.record_promoted_model(cycle.metrics["candidate"])


def start_shadow(registry: ModelRegistry, version: str, reason: str) -> dict[str, Any]:
    """Start the roll-out of a just-published candidate as a shadow; a roll-out still in progress is superseded."""
    rollouts = Rollouts(registry)
    present = rollouts.state()
    if present is not None:
        rollouts.abort(reason=f"superseded by {version}")
    state = rollouts.start_shadow(version, reason=reason)
    return {"stage": state.key, "superseded": present.candidate if present else None}
