"""`guardloop simulate` (the whole loop with oracle labels) and `guardloop simulate-report` (mean over seeds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from guardloop.cli.app import app, friendly_errors, load_settings, setup_logging
from guardloop.core.datafiles import load_examples
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.trainer.simulation_results import (
    IterationResult,
    iteration_line,
    read_result_lines,
    summarize,
    summary_table,
)


@app.command()
@friendly_errors
def simulate(
    pool: Annotated[Path, typer.Option(help="labeled file whose labels play the reviewers (oracle)")],
    seed_data: Annotated[Path, typer.Option(help="labeled seed set the first model is trained on")],
    dev: Annotated[Path, typer.Option(help="labeled file for early stopping")],
    eval_data: Annotated[
        Path | None, typer.Option("--eval", help="held-out labeled file (default: --eval-fraction of the pool)")
    ] = None,
    eval_fraction: Annotated[float, typer.Option(min=0.05, max=0.9)] = 0.3,
    strategy: Annotated[
        list[str] | None,
        typer.Option(help="rare-cluster (default), cluster (the paper's), random, topn, coreset, ... (repeatable)"),
    ] = None,
    iterations: Annotated[int, typer.Option(min=1)] = 5,
    per_iteration: Annotated[int, typer.Option(min=1)] = 20,
    variations: Annotated[int, typer.Option(min=0, help="LLM variations per labeled item, at most (0: none)")] = 5,
    variation_budget: Annotated[
        str | None,
        typer.Option(help="deficit: variations go to the thinnest classes; uniform: k per item (default: settings)"),
    ] = None,
    clusters: Annotated[int | None, typer.Option(min=2, help="k-means K for cluster (default: per-iteration)")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="random seed (repeatable)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 6,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    results_file: Annotated[
        Path | None,
        typer.Option("--results", help="append one JSON line per finished iteration here (kept if the run stops)"),
    ] = None,
) -> None:
    """The whole loop with oracle labels: per iteration the acquired class counts (labels, and with variations),
    their std, eval macro-F1 and F1 per class, and the share of variations the verifier rejected."""
    # The train extra (torch, scikit-learn): a serve-only install cannot simulate.
    from guardloop.trainer.simulate import SimulationPlan, run_simulations
    from guardloop.trainer.strategies import STRATEGIES

    strategies = strategy or ["rare-cluster"]  # the cycle's default (settings.cycle_strategy)
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if variation_budget not in (None, "deficit", "uniform"):
        raise UserError(f"--variation-budget {variation_budget!r}: choose deficit or uniform")
    if results_file is not None:
        try:  # before hours of training, not after the first iteration
            results_file.open("a", encoding="utf-8").close()
        except OSError as exc:
            raise UserError(f"--results {results_file}: cannot append there ({exc.strerror})") from None
    plan = SimulationPlan(
        pool=load_examples([pool]).examples,
        seed_data=load_examples([seed_data]).examples,
        dev=load_examples([dev]).examples,
        eval_data=load_examples([eval_data]).examples if eval_data else None,
        eval_fraction=eval_fraction,
        strategies=strategies,
        seeds=seed or [13],
        iterations=iterations,
        per_iteration=per_iteration,
        variations=variations,
        clusters=clusters,
        epochs=epochs,
        results_file=results_file,
        variation_budget=variation_budget,
    )
    setup_logging()

    def show(name: str, seed_value: int, it: IterationResult) -> None:
        typer.echo(iteration_line(name, seed_value, it), err=True)

    runs = [run.as_dict() for run in run_simulations(plan, load_settings(), on_iteration=show)]
    if as_json:
        typer.echo(json.dumps({"runs": runs, "labels": list(LABELS)}))
        return
    for line in summary_table(summarize([{**it, **run} for run in runs for it in run["iterations"]])):
        typer.echo(line)


@app.command("simulate-report")
@friendly_errors
def simulate_report(
    results_files: Annotated[list[Path], typer.Argument(help="JSON-lines files written by simulate --results")],
) -> None:
    """Mean over seeds, per strategy and iteration, of runs recorded with `simulate --results`."""
    lines = []
    for path in results_files:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            lines += read_result_lines(path)
        except ValueError as exc:
            raise UserError(f"{path}: not a simulate --results file ({exc})") from None
    if not lines:
        raise UserError("no finished iterations in " + ", ".join(map(str, results_files)))
    for line in summary_table(summarize(lines)):
        typer.echo(line)
