"""`guardloop cycle --now` (one active-learning cycle by hand) and `guardloop cycles list|show` (their records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from guardloop.cli.app import app, friendly_errors, load_settings, open_database, setup_logging
from guardloop.core.errors import UserError
from guardloop.storage.cycles import CycleRepository, CycleView

cycles_app = typer.Typer(help="Records of active-learning cycles.", no_args_is_help=True)
app.add_typer(cycles_app, name="cycles")


def print_cycle(cycle: CycleView) -> None:
    typer.echo(f"cycle {cycle.id}: {cycle.status}" + (f" ({cycle.reason})" if cycle.reason else ""))
    for step in cycle.steps:
        extra = {k: v for k, v in step.items() if k not in ("step", "seconds")}
        typer.echo(f"  {step['step']:<22}{step['seconds']:>8.1f}s  {json.dumps(extra) if extra else ''}")
    for name, numbers in (cycle.metrics.get("eval_sets") or {}).items():
        typer.echo(f"  {_eval_set_line(name, numbers, decided=cycle.metrics.get('gate_set') == name)}")
    if cycle.model_version:
        typer.echo(f"  published {cycle.model_version}")


def _eval_set_line(name: str, numbers: dict[str, Any], *, decided: bool) -> str:
    """One gate set's macro-F1 for candidate and current (the gold reserve with how full it is)."""

    def f1(report: dict[str, Any] | None) -> str:
        return "-" if not report else f"{report['macro_f1']:.4f}"

    size = f"n={numbers.get('n', 0)}"
    if "min_per_class" in numbers:
        size += f", {min(numbers['per_class'].values())} of {numbers['min_per_class']} per class in the thinnest"
    line = f"{name} ({size}): macro-F1 candidate {f1(numbers.get('candidate'))}, current {f1(numbers.get('current'))}"
    return line + (" (the gate judged on it)" if decided else "")


@app.command("cycle")
@friendly_errors
def run_cycle(
    now: Annotated[bool, typer.Option("--now", help="run one cycle now (required: the schedule is `trainer`)")] = False,
    oracle: Annotated[Path | None, typer.Option(help="labeled file that answers the label requests")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="a query strategy: random, topn, coreset, cluster, ... (default: settings)")
    ] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="labels to request (default: settings)")] = None,
) -> None:
    """Run (or resume) one active-learning cycle by hand, with progress."""
    if not now:
        raise UserError("say --now to run a cycle by hand; `guardloop trainer` runs them on a schedule")
    setup_logging()
    # The train extra (scikit-learn, torch): a serve-only install runs no cycles.
    from guardloop.trainer.cycle import CycleBusy, build_cycle_runner
    from guardloop.trainer.strategies import STRATEGIES

    updates = {k: v for k, v in {"cycle_strategy": strategy, "cycle_budget": budget}.items() if v is not None}
    if strategy is not None and strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    settings = load_settings().model_copy(update=updates)
    runner = build_cycle_runner(settings, oracle=oracle, progress=True)
    try:
        result = runner.run()
    except CycleBusy as exc:
        raise UserError(str(exc)) from None
    print_cycle(result)
    if result.status == "failed":
        raise typer.Exit(1)


@cycles_app.command("list")
@friendly_errors
def cycles_list(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """Recent cycles, newest first."""
    rows = CycleRepository(open_database()).recent(limit)
    if not rows:
        typer.echo("no cycles yet")
    for row in rows:
        typer.echo(
            f"{row.id}  {row.status:<16}{row.started_at:%Y-%m-%d %H:%M}  {row.model_version or '-'}  {row.reason or ''}"
        )


@cycles_app.command("show")
@friendly_errors
def cycles_show(cycle_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One cycle's record: status, steps with durations, counts, metrics."""
    row = CycleRepository(open_database()).get(cycle_id)
    if row is None:
        raise UserError(f"no cycle {cycle_id!r}; see `guardloop cycles list`")
    if as_json:
        typer.echo(json.dumps(row.as_json()))
    else:
        print_cycle(row)
