"""`guardloop variations`: ask the LLM for label-preserving rewrites of labeled rows, and show what it kept."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from guardloop.cli.app import (
    app,
    friendly_errors,
    load_labeled,
    load_settings,
    setup_logging,
)
from guardloop.core.errors import UserError
from guardloop.core.settings import Settings
from guardloop.models.registry import ModelRegistry, open_classifier
from guardloop.trainer.variations import VariationBatch, VariationGenerator, VariationResult
from guardloop.trainer.variations.companions import companions_for
from guardloop.trainer.variations.llm_server import LLMServerError
from guardloop.trainer.variations.verifier import VerifierConfig, lazy_embedder


@app.command()
@friendly_errors
def variations(
    data: Annotated[Path, typer.Option("--data", help="labeled TSV/CSV/JSONL file")],
    k: Annotated[
        int | None, typer.Option("-k", "--k", min=1, max=20, help="variations per row (default: settings)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="only the first N rows (each takes seconds)")] = 10,
    consistency: Annotated[
        bool, typer.Option(help="drop variations the current model confidently puts in another class")
    ] = True,
    verify: Annotated[
        bool | None, typer.Option(help="run the verifier every kept variation must pass (default: settings)")
    ] = None,
    compose: Annotated[
        int,
        typer.Option(
            min=0, max=8, help="instead of rewrites: new posts of a row's class from it and N other rows of its class"
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
) -> None:
    """Ask the LLM (GUARDLOOP_LLM_*, default: the embedded SmolLM2) for label-preserving variations of labeled rows."""
    setup_logging()
    for noisy in ("httpx", "httpx2"):  # one line per HTTP request drowns the per-row lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings()
    if k is not None:
        settings = settings.model_copy(update={"llm_variations": k})
    if verify is not None:
        settings = settings.model_copy(update={"llm_verify": verify})
    loaded = load_labeled([data], text_column, label_column, skip_bad_rows)
    rows = [(ex.text, ex.label or "") for ex in loaded.examples[:limit]]
    if not rows:
        raise UserError(f"{data}: no labeled rows")
    every_row = [(ex.text, ex.label or "") for ex in loaded.examples]
    companions = companions_for(rows, every_row, compose, random_state=settings.seed) if compose else None
    predict_proba, model_version = None, None
    if consistency:
        predict_proba, model_version = _current_model_predict_proba(settings)
        if predict_proba is None:
            typer.echo("no current model in the registry: consistency filter off", err=True)
    try:
        embed = _embedder(settings) if settings.llm_verify else None
        with VariationGenerator.from_settings(settings, predict_proba=predict_proba, embed=embed) as generator:
            batch = _compose_all(generator, rows, companions) if companions else generator.generate_many(rows)
            endpoint, llm_model = generator.endpoint, generator.model
    except LLMServerError as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    stats = batch.stats
    if as_json:
        summary = {"endpoint": endpoint, "model": llm_model, "consistency_model": model_version}
        items = [result.as_dict() for result in batch.results]
        for item, others in zip(items, companions or (), strict=False):
            item["companions"] = others
        typer.echo(json.dumps(summary | {"items": items, "stats": stats.as_dict()}))
    else:
        for result in batch.results:
            typer.echo(f"[{result.label}] {result.text}")
            for variation in result.accepted:
                typer.echo(f"  + {variation}")
            if result.filtered:
                typer.echo("  filtered: " + ", ".join(f"{why} {n}" for why, n in sorted(result.filtered.items())))
            if result.failed:
                typer.echo(f"  FAILED after {result.attempts} attempt(s): {result.error}: {result.error_detail}")
        seconds_per_row = stats.request_seconds / max(1, stats.requests)
        typer.echo(
            f"{stats.accepted} accepted, {stats.filtered_total} filtered, {stats.items_failed} of {stats.items} rows "
            f"failed; {stats.requests} requests ({stats.retries} retries), {seconds_per_row:.1f}s per request, "
            f"{stats.completion_tokens / max(stats.request_seconds, 1e-9):.0f} tokens/s from {llm_model} at {endpoint}"
        )
    if stats.items_failed == stats.items:
        first = batch.results[0]
        raise UserError(f"the LLM at {endpoint} failed on every row; first: {first.error}: {first.error_detail}")


def _compose_all(
    generator: VariationGenerator, rows: list[tuple[str, str]], companions: list[list[str]]
) -> VariationBatch:
    """New posts composed for each row from it and its companions; a row without companions gets none."""
    before = copy.deepcopy(generator.stats)
    results = [
        generator.compose(text, label, others) if others else VariationResult(text=text, label=label)
        for (text, label), others in zip(rows, companions, strict=True)
    ]
    return VariationBatch(results=results, stats=generator.stats.since(before))


@app.command("verify-variations")
@friendly_errors
def verify_variations(
    sample: Annotated[
        Path, typer.Option(help="hand-labeled variations, JSON lines: source, label, variation, hand_label")
    ] = Path("docs/variations-hand-labeled.jsonl"),
    judge: Annotated[bool, typer.Option(help="ask the LLM (GUARDLOOP_LLM_*) the constrained label question")] = True,
    drift: Annotated[bool, typer.Option(help="reject rewrites far from their original (MiniLM embeddings)")] = True,
    min_source_cosine: Annotated[float | None, typer.Option(min=-1, max=1, help="drift threshold")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """The off-label rate of hand-labeled variations before and after the verifier every variation must pass."""
    from guardloop.bench.verifier import judge_sample, load_sample, report_lines, summarize

    setup_logging()
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sample.is_file():
        raise UserError(f"--sample {sample}: no such file")
    try:
        rows = load_sample(sample)
    except ValueError as exc:
        raise UserError(f"--sample {sample}: {exc}") from None
    if not rows:
        raise UserError(f"--sample {sample}: no rows")
    settings = load_settings()
    defaults = VerifierConfig()
    config = VerifierConfig(
        min_source_cosine=defaults.min_source_cosine if min_source_cosine is None else min_source_cosine
    )
    embed = _embedder(settings) if drift else None
    try:
        with VariationGenerator.from_settings(settings, embed=embed) as generator:
            generator.config = dataclasses.replace(generator.config, verifier=config, judge=judge)
            summary = summarize(judge_sample(rows, generator.verifier()))
            summary["llm"] = generator.model if judge else None
    except LLMServerError as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    summary |= {"judge": judge, "drift": drift, "min_source_cosine": config.min_source_cosine}
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for line in report_lines(summary):
        typer.echo(line)


def _embedder(settings: Settings) -> Callable[[list[str]], np.ndarray]:
    """The cycle's sentence embedder, loaded (and exported into the data directory's cache) on first use."""
    return lazy_embedder(settings.data_dir / "cache")


def _current_model_predict_proba(
    settings: Settings,
) -> tuple[Callable[[list[str]], np.ndarray] | None, str | None]:
    """The registry's current model as predict_proba (texts -> (n, 6)), or (None, None) with no current model."""
    registry = ModelRegistry(settings.registry_dir)
    version = registry.current()
    if version is None:
        return None, None
    return open_classifier(registry, version, threads=1, max_seq_len=settings.max_seq_len).predict_proba, version
