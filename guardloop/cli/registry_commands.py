"""`guardloop models ...`: list, inspect, promote and roll back versions of the model registry; roll out a new
version as a shadow, then a canary (status, shadow, canary)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from guardloop.cli.app import app, friendly_errors, load_settings, open_database, open_registry
from guardloop.core.errors import UserError
from guardloop.core.rollout_judgement import shadow_summary
from guardloop.models.registry import ModelRegistry
from guardloop.models.rollout import Rollouts, RolloutState
from guardloop.storage import Database
from guardloop.storage.rollout_tallies import RolloutRepository
from guardloop.trainer.rollout_step import advance_rollout

models_app = typer.Typer(help="The model registry: list, inspect, promote, roll back.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@friendly_errors
def models_list() -> None:
    """Published versions, oldest first; * marks the current one."""
    registry = open_registry()
    current = registry.current()
    versions = registry.versions()
    if not versions:
        typer.echo("no published versions")
    for version in versions:
        card = registry.card(version)
        f1 = (card.metrics.get("dev") or {}).get("macro_f1")
        mark = "*" if version == current else " "
        typer.echo(
            f"{mark} {version}  {card.created_at:%Y-%m-%d %H:%M}  dev macro-F1 "
            f"{'n/a' if f1 is None else f'{f1:.4f}'}  parent {card.parent or '-'}"
        )


@models_app.command("show")
@friendly_errors
def models_show(version: Annotated[str | None, typer.Argument(help="default: current")] = None) -> None:
    """Print a version's model card as JSON."""
    registry = open_registry()
    version = version or registry.current()
    if version is None:
        raise UserError("no current model; name a version")
    typer.echo(registry.card(version).model_dump_json(indent=2))


@models_app.command("promote")
@friendly_errors
def models_promote(version: str) -> None:
    """Make VERSION current; running services follow within their poll interval."""
    open_registry().promote(version)
    typer.echo(f"current is now {version}")


@models_app.command("rollback")
@friendly_errors
def models_rollback() -> None:
    """Switch current back to the version that was current before."""
    typer.echo(f"current is now {open_registry().rollback()}")


# ----------------------------------------------------------------------------- roll-out (models/rollout.py)
@models_app.command("shadow")
@friendly_errors
def models_shadow(version: str) -> None:
    """Start rolling out VERSION as a shadow: every replica scores a share of live traffic with it, answers nothing."""
    state = Rollouts(open_registry()).start_shadow(version, reason="guardloop models shadow")
    typer.echo(f"{state.candidate} is now a shadow of {state.baseline or 'nothing'}")


@models_app.command("canary")
@friendly_errors
def models_canary(
    version: Annotated[
        str | None, typer.Argument(help="the version to route traffic to (default: the shadow's)")
    ] = None,
    share: Annotated[float | None, typer.Option(help="share of traffic, 0-1 (default: the first canary step)")] = None,
    by: Annotated[str | None, typer.Option(help="'client' (stable per client) or 'request'")] = None,
    advance: Annotated[bool, typer.Option("--advance", help="judge the roll-out and move it one step on")] = False,
    abort: Annotated[bool, typer.Option("--abort", help="end the roll-out; `current` stays as it is")] = False,
) -> None:
    """Start or raise a canary, or move the roll-out on (--advance) or end it (--abort)."""
    settings = load_settings()
    registry = open_registry()
    rollouts = Rollouts(registry)
    if abort:
        typer.echo(f"roll-out of {rollouts.abort(reason='guardloop models canary --abort')} aborted")
        return
    if advance:
        step = advance_rollout(settings, registry, open_database())
        typer.echo(f"{step.action}: {step.reason}")
        return
    present = rollouts.state()
    version = version or (present.candidate if present else None)
    if version is None:
        raise UserError("no roll-out in progress: name the VERSION to canary")
    if by not in (None, "client", "request"):
        raise UserError(f"--by {by!r}: use 'client' or 'request'")
    routing = by or (present.by if present and present.stage == "canary" else settings.canary_by)
    state = rollouts.start_canary(version, settings.canary_steps[0] if share is None else share, by=routing)  # type: ignore[arg-type]
    typer.echo(f"{state.candidate} answers {state.share:g} of traffic (by {state.by})")


@models_app.command("status")
@friendly_errors
def models_status(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The current version, the roll-out in progress and what the replicas saw it do."""
    registry = open_registry()
    status = rollout_status(registry, Rollouts(registry).state(), open_database())
    if as_json:
        typer.echo(json.dumps(status, indent=2, default=str))
        return
    typer.echo(f"current: {status['current'] or '-'}")
    rollout = status["rollout"]
    if rollout is None:
        typer.echo("roll-out: none")
    else:
        typer.echo(
            f"roll-out: {rollout['candidate']} in {rollout['key']} (by {rollout['by']}, since {rollout['since']})"
        )
        typer.echo(f"tallies: {json.dumps(status['tallies'], default=str)}")
        if status["halted"]:
            typer.echo(f"halted: {status['halted']} (run `guardloop models canary --advance` to record the rollback)")
    for event in status["events"]:
        typer.echo(f"  {event['at']}  {event['event']:<8} {event['candidate']}  {event['reason']}")


def rollout_status(registry: ModelRegistry, state: RolloutState | None, database: Database) -> dict[str, Any]:
    tallies = RolloutRepository(database)
    status: dict[str, Any] = {
        "current": registry.current(),
        "rollout": None,
        "tallies": None,
        "halted": None,
        "events": [event.model_dump(mode="json") for event in Rollouts(registry).events()[-5:]],
    }
    if state is not None:
        status["rollout"] = {**state.model_dump(mode="json"), "key": state.key}
        counts = tallies.totals(state.candidate, state.key)
        status["tallies"] = shadow_summary(counts) if state.stage == "shadow" else counts
        halt = tallies.halt_of(state.candidate)
        status["halted"] = halt.reason if halt else None
    return status
