"""`guardloop`: one command line for every job (serve, train, eval, models, bench, ...).

User errors end with one readable line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from guardloop.core.datafiles import DataFileError, load_examples
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings

app = typer.Typer(
    help="guardloop: a safety classifier that keeps learning from the traffic it guards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: list, inspect, promote, roll back.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from guardloop.models.onnx_model import ModelLoadError
    from guardloop.models.registry import RegistryError

    errors: list[type[BaseException]] = [UserError, DataFileError, RegistryError, ModelLoadError, ValidationError]
    try:
        from guardloop.trainer.base_models import BaseModelMissing

        errors.append(BaseModelMissing)
    except ImportError:  # serve-only install: no trainer dependencies
        pass
    from guardloop.storage import ReviewError, StorageError

    errors += [StorageError, ReviewError]
    return tuple(errors)


def friendly_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _user_errors() as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if type(exc).__name__ == "ValidationError":
                message = "invalid setting: " + " ".join(str(exc).split())
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def load_settings() -> Settings:
    return Settings()


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parse_column(value: str | None) -> str | int | None:
    return None if value is None else int(value) if value.isdigit() else value


# --------------------------------------------------------------------------------------------- serve
@app.command()
@friendly_errors
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: settings, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: settings, 8000)")] = None,
    bootstrap: Annotated[bool, typer.Option(help="train a model from the seed data if the registry is empty")] = True,
    with_trainer: Annotated[
        bool, typer.Option(help="also run the scheduled active-learning cycle in this process")
    ] = False,
) -> None:
    """Serve POST /classify; with an empty registry, first train a bootstrap model from the seed data."""
    import uvicorn

    from guardloop.models.registry import ModelRegistry
    from guardloop.service.app import create_app

    _setup_logging()
    settings = load_settings()
    bind = host or settings.host
    if not settings.api_keys and bind not in ("127.0.0.1", "::1", "localhost"):
        typer.echo(
            f"warning: serving on {bind} without API keys: anyone who reaches it can classify and fill the pool; "
            "set GUARDLOOP_API_KEYS",
            err=True,
        )
    registry = ModelRegistry(settings.registry_dir)
    if registry.current() is None and bootstrap:
        from guardloop.trainer.cycle import train_bootstrap_model

        typer.echo("no model in the registry yet: training a bootstrap model from the seed data", err=True)
        version = train_bootstrap_model(settings, registry)
        typer.echo(f"published bootstrap model {version}", err=True)
    scheduler = None
    if with_trainer:
        from guardloop.trainer.cycle import build_cycle_runner
        from guardloop.trainer.scheduler import build_scheduler

        runner = build_cycle_runner(settings)
        runner.export_last_promoted()  # the cycle metrics then show on this service's /metrics
        scheduler = build_scheduler(settings, _guarded(runner.run), blocking=False)
        scheduler.start()
    try:
        uvicorn.run(
            create_app(settings),
            host=host or settings.host,
            port=port or settings.port,
            log_level="info",
            access_log=settings.access_log,
        )
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)


def _guarded(run: Callable[[], Any]) -> Callable[[], None]:
    """A scheduled cycle logs what stopped it (busy lock, failure) instead of killing the scheduler."""

    def job() -> None:
        from guardloop.trainer.cycle import CycleBusy

        try:
            cycle = run()
            logging.getLogger("guardloop.trainer").info(
                "cycle %s ended this run as %s%s", cycle.id, cycle.status, f": {cycle.reason}" if cycle.reason else ""
            )
        except CycleBusy as exc:
            logging.getLogger("guardloop.trainer").info("cycle skipped: %s", exc)
        except Exception:
            logging.getLogger("guardloop.trainer").exception("cycle run failed")

    return job


# --------------------------------------------------------------------------------------------- train
def _train(
    settings: Settings,
    data: list[Path],
    dev: Path | None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    skip_bad_rows: bool = False,
    unlabeled: list[Path] | None = None,
    progress: bool = True,
    **config_overrides: Any,
) -> str:
    columns = {"text_column": _parse_column(text_column), "label_column": _parse_column(label_column)}
    train_data = load_examples(data, skip_bad_rows=skip_bad_rows, **columns)
    dev_data = load_examples([dev], skip_bad_rows=skip_bad_rows, **columns) if dev else None
    unlabeled_texts = []
    if unlabeled:
        loaded = load_examples(
            unlabeled, require_labels=False, skip_bad_rows=skip_bad_rows, text_column=columns["text_column"]
        )
        unlabeled_texts = [ex.text for ex in loaded.examples]
    for bad in [*train_data.bad_rows, *(dev_data.bad_rows if dev_data else [])]:
        typer.echo(f"skipped {bad.path}:{bad.line}: {bad.reason}", err=True)
    # Heavy imports (torch, transformers) only after the data has been checked: bad input fails fast.
    from guardloop.models.registry import ModelRegistry
    from guardloop.trainer.finetune import FineTuneConfig
    from guardloop.trainer.train import TrainJob, train_and_publish

    teacher = config_overrides.pop("teacher", None)
    teacher_epochs = config_overrides.pop("teacher_epochs", 4)
    config = FineTuneConfig(seed=settings.seed, **{k: v for k, v in config_overrides.items() if v is not None})
    fingerprints = dict(train_data.fingerprints) | (dev_data.fingerprints if dev_data else {})
    job = TrainJob(
        train=train_data.examples,
        dev=dev_data.examples if dev_data else None,
        config=config,
        fingerprints=fingerprints,
        unlabeled=unlabeled_texts,
        teacher=teacher,
        teacher_epochs=teacher_epochs,
        cache_dir=settings.data_dir / "cache",
        progress=progress,
    )
    outcome = train_and_publish(job, ModelRegistry(settings.registry_dir))
    card = outcome.card
    dev_f1 = (card.metrics.get("dev") or {}).get("macro_f1")
    check = card.metrics["onnx_check"]
    typer.echo(
        f"published {outcome.version} (current): dev macro-F1 "
        f"{'n/a' if dev_f1 is None else f'{dev_f1:.4f}'}, int8 ONNX agrees with torch on {check['agreement']:.1%} "
        f"(torch {check['torch_macro_f1']:.4f}, onnx {check['onnx_macro_f1']:.4f}), "
        f"{card.training['seconds']}s training",
        err=True,
    )
    return outcome.version or ""


@app.command()
@friendly_errors
def train(
    data: Annotated[list[Path], typer.Option("--data", help="labeled TSV/CSV/JSONL file (repeatable)")],
    dev: Annotated[Path | None, typer.Option(help="labeled file for early stopping (macro-F1)")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column name or 0-based index")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column name or 0-based index")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="report bad rows and go on instead of stopping")] = False,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: settings)")] = None,
    class_weight_power: Annotated[
        float | None, typer.Option(min=0, max=1, help="0 = unweighted loss, 1 = fully class-balanced")
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="distill from a teacher: 'mpnet'")] = None,
    teacher_epochs: Annotated[int, typer.Option(min=1)] = 4,
    unlabeled: Annotated[list[Path] | None, typer.Option(help="unlabeled texts for the teacher to soft-label")] = None,
) -> None:
    """Fine-tune all-MiniLM-L6-v2, export int8 ONNX, verify it against torch, publish it as current."""
    if teacher not in (None, "mpnet"):
        raise UserError(f"unknown teacher {teacher!r}; the teacher that installs here is 'mpnet'")
    if unlabeled and not teacher:
        raise UserError("--unlabeled needs --teacher: only a teacher can learn from unlabeled texts")
    settings = load_settings()
    if seed is not None:
        settings = settings.model_copy(update={"seed": seed})
    version = _train(
        settings,
        data,
        dev,
        text_column=text_column,
        label_column=label_column,
        skip_bad_rows=skip_bad_rows,
        unlabeled=unlabeled,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        class_weight_power=class_weight_power,
        teacher=teacher,
        teacher_epochs=teacher_epochs,
    )
    typer.echo(version)


def _load_version(settings: Settings, model: str | None) -> tuple[str, Any, Any]:
    """(version, card, classifier) of `model`, or of the current version."""
    from guardloop.models.onnx_model import OnnxClassifier
    from guardloop.models.registry import ModelRegistry

    registry = ModelRegistry(settings.registry_dir)
    version = model or registry.current()
    if version is None:
        raise UserError(f"no current model in {settings.registry_dir}; train one or pass --model VERSION")
    card = registry.card(version)
    classifier = OnnxClassifier(
        registry.path(version), version=version, thresholds=card.thresholds, threads=2, max_seq_len=settings.max_seq_len
    )
    return version, card, classifier


# --------------------------------------------------------------------------------------------- eval
@app.command("eval")
@friendly_errors
def evaluate(
    data: Annotated[list[Path], typer.Option("--data", help="labeled TSV/CSV/JSONL file (repeatable)")],
    model: Annotated[str | None, typer.Option(help="registry version (default: current)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
) -> None:
    """Accuracy, macro precision/recall/F1, per-class F1 and the confusion matrix of a served (ONNX) model."""
    from guardloop.trainer.metrics import classification_report

    settings = load_settings()
    loaded = load_examples(
        data,
        text_column=_parse_column(text_column),
        label_column=_parse_column(label_column),
        skip_bad_rows=skip_bad_rows,
    )
    version, _, classifier = _load_version(settings, model)
    texts = [ex.text for ex in loaded.examples]
    # One text per forward pass, as a lone request is served: dynamic int8 quantization scales activations per
    # batch, so a text's scores move slightly with its batch-mates (up to ~0.7 macro-F1 points measured here).
    preds = [LABELS[i] for i in classifier.predict_many(texts, batch_size=1).argmax(axis=1)]
    report = classification_report([ex.label for ex in loaded.examples], preds) | {"model_version": version}
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"model {version} on {len(texts)} texts")
    typer.echo(
        f"accuracy {report['accuracy']:.4f}  macro P {report['macro_precision']:.4f}  "
        f"R {report['macro_recall']:.4f}  F1 {report['macro_f1']:.4f}"
    )
    typer.echo(f"{'label':<22}{'F1':>8}{'P':>8}{'R':>8}{'n':>6}")
    for label in LABELS:
        typer.echo(
            f"{label:<22}{report['per_class_f1'][label]:>8.4f}{report['per_class_precision'][label]:>8.4f}"
            f"{report['per_class_recall'][label]:>8.4f}{report['support'][label]:>6}"
        )
    typer.echo("confusion matrix (rows = true, columns = predicted, order as above)")
    for label, row in zip(LABELS, report["confusion_matrix"], strict=True):
        typer.echo(f"{label:<22}" + "".join(f"{v:>6}" for v in row))


# --------------------------------------------------------------------------------------------- calibrate
@app.command()
@friendly_errors
def calibrate(
    data: Annotated[list[Path], typer.Option("--data", help="labeled TSV/CSV/JSONL file (repeatable)")],
    target_precision: Annotated[
        list[str] | None,
        typer.Option(
            help="P for every category, or LABEL=P for one (repeatable): lowest threshold with precision >= P"
        ),
    ] = None,
    target_recall: Annotated[
        list[str] | None,
        typer.Option(help="R for every category, or LABEL=R for one (repeatable): highest threshold with recall >= R"),
    ] = None,
    model: Annotated[str | None, typer.Option(help="registry version to calibrate (default: current)")] = None,
    promote: Annotated[bool, typer.Option(help="make the calibrated version current")] = True,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
) -> None:
    """Tune per-category thresholds on a labeled file; publish them as a new version (parent: the old one)."""
    from guardloop.models.registry import ModelRegistry
    from guardloop.trainer.calibrate import CalibrationError, calibrate_thresholds, parse_targets, publish_calibrated

    try:
        targets = parse_targets(target_precision or [], target_recall or [])
    except CalibrationError as exc:
        raise UserError(str(exc)) from None
    settings = load_settings()
    loaded = load_examples(
        data,
        text_column=_parse_column(text_column),
        label_column=_parse_column(label_column),
        skip_bad_rows=skip_bad_rows,
    )
    for bad in loaded.bad_rows:
        typer.echo(f"skipped {bad.path}:{bad.line}: {bad.reason}", err=True)
    version, card, classifier = _load_version(settings, model)
    texts = [ex.text for ex in loaded.examples]
    probs = classifier.predict_many(texts)
    results = calibrate_thresholds(probs, [ex.label or "" for ex in loaded.examples], card.thresholds, targets)
    typer.echo(f"model {version} on {len(texts)} texts")
    typer.echo(f"{'label':<22}{'target':>16}{'threshold':>20}{'P':>8}{'R':>8}{'n':>6}")
    for c in results:
        numbers = f"{c.precision:>8.3f}{c.recall:>8.3f}" if c.reached else f"{'-':>8}{'-':>8}"
        change = f"{c.previous:.3f} -> {c.threshold:.3f}" if c.reached else f"{c.previous:.3f} (kept)"
        typer.echo(f"{c.label:<22}{c.target.metric + ' ' + str(c.target.value):>16}{change:>20}{numbers}{c.support:>6}")
        if c.note:
            typer.echo(f"  {c.label}: {c.note}", err=True)
    if not any(c.reached for c in results):
        raise UserError("no threshold was calibrated (see above); nothing published")
    overridden = sorted(c.label for c in results if c.reached and c.label in settings.thresholds)
    if overridden:
        typer.echo(
            f"note: settings (GUARDLOOP_THRESHOLDS) override {', '.join(overridden)}; services keep those values",
            err=True,
        )
    new_version = publish_calibrated(
        ModelRegistry(settings.registry_dir),
        version,
        results,
        data_fingerprints=loaded.fingerprints,
        n_examples=len(texts),
        make_current=promote,
    )
    typer.echo(f"published {new_version} (parent {version}){' as current' if promote else ''}", err=True)
    typer.echo(new_version)


# --------------------------------------------------------------------------------------------- cycle
cycles_app = typer.Typer(help="Records of active-learning cycles.", no_args_is_help=True)
app.add_typer(cycles_app, name="cycles")


def _print_cycle(cycle: Any) -> None:
    typer.echo(f"cycle {cycle.id}: {cycle.status}" + (f" ({cycle.reason})" if cycle.reason else ""))
    for step in cycle.steps:
        extra = {k: v for k, v in step.items() if k not in ("step", "seconds")}
        typer.echo(f"  {step['step']:<22}{step['seconds']:>8.1f}s  {json.dumps(extra) if extra else ''}")
    if cycle.model_version:
        typer.echo(f"  published {cycle.model_version}")


@app.command()
@friendly_errors
def cycle(
    now: Annotated[bool, typer.Option("--now", help="run one cycle now (required: the schedule is `trainer`)")] = False,
    oracle: Annotated[Path | None, typer.Option(help="labeled file that answers the label requests")] = None,
    strategy: Annotated[str | None, typer.Option(help="random, topn, coreset or cluster (default: settings)")] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="labels to request (default: settings)")] = None,
) -> None:
    """Run (or resume) one active-learning cycle by hand, with progress."""
    if not now:
        raise UserError("say --now to run a cycle by hand; `guardloop trainer` runs them on a schedule")
    _setup_logging()
    from guardloop.trainer.cycle import CycleBusy, build_cycle_runner

    updates = {k: v for k, v in {"cycle_strategy": strategy, "cycle_budget": budget}.items() if v is not None}
    if strategy is not None and strategy not in ("random", "topn", "coreset", "cluster"):
        raise UserError(f"unknown strategy {strategy!r}; choose from random, topn, coreset, cluster")
    settings = load_settings().model_copy(update=updates)
    runner = build_cycle_runner(settings, oracle=oracle, progress=True)
    try:
        result = runner.run()
    except CycleBusy as exc:
        raise UserError(str(exc)) from None
    _print_cycle(result)
    if result.status == "failed":
        raise typer.Exit(1)


@app.command()
@friendly_errors
def trainer() -> None:
    """The trainer process: runs the active-learning cycle on the configured schedule (interval or cron)."""
    _setup_logging()
    from guardloop.trainer.cycle import build_cycle_runner
    from guardloop.trainer.scheduler import ScheduleError, build_scheduler

    settings = load_settings()
    runner = build_cycle_runner(settings)
    try:
        scheduler = build_scheduler(settings, _guarded(runner.run), blocking=True)
    except ScheduleError as exc:
        raise UserError(str(exc)) from None
    from prometheus_client import start_http_server

    try:  # the cycle, LLM and variation metrics (the CycleRunner exposed them) on their own port
        start_http_server(settings.trainer_metrics_port, addr=settings.host)
    except OSError as exc:
        raise UserError(
            f"cannot serve /metrics on {settings.host}:{settings.trainer_metrics_port} ({exc.strerror or exc}); "
            "set GUARDLOOP_TRAINER_METRICS_PORT"
        ) from None
    runner.export_last_promoted()
    typer.echo(
        f"trainer: cycles on {scheduler.get_job('cycle').trigger}; "
        f"metrics on http://{settings.host}:{settings.trainer_metrics_port}/metrics",
        err=True,
    )
    scheduler.start()


@cycles_app.command("list")
@friendly_errors
def cycles_list(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """Recent cycles, newest first."""
    from guardloop.storage import Database
    from guardloop.storage.cycles import CycleRepository

    database = Database(load_settings().database_url_value)
    database.ensure_schema()
    rows = CycleRepository(database).recent(limit)
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
    from guardloop.storage import Database
    from guardloop.storage.cycles import CycleRepository

    database = Database(load_settings().database_url_value)
    database.ensure_schema()
    row = CycleRepository(database).get(cycle_id)
    if row is None:
        raise UserError(f"no cycle {cycle_id!r}; see `guardloop cycles list`")
    if as_json:
        typer.echo(json.dumps(row.as_json()))
    else:
        _print_cycle(row)


# --------------------------------------------------------------------------------------------- simulate
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
    strategy: Annotated[list[str] | None, typer.Option(help="random, topn, coreset, cluster (repeatable)")] = None,
    iterations: Annotated[int, typer.Option(min=1)] = 5,
    per_iteration: Annotated[int, typer.Option(min=1)] = 20,
    variations: Annotated[int, typer.Option(min=0, help="LLM variations per labeled item (0: none)")] = 5,
    clusters: Annotated[int | None, typer.Option(min=2, help="k-means K for cluster (default: per-iteration)")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="random seed (repeatable)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 6,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    results_file: Annotated[
        Path | None,
        typer.Option("--results", help="append one JSON line per finished iteration here (kept if the run stops)"),
    ] = None,
) -> None:
    """The whole loop with oracle labels: per iteration the acquired class counts, their std, and eval macro-F1."""
    strategies = strategy or ["cluster"]
    seeds = seed or [13]
    from guardloop.trainer.strategies import STRATEGIES

    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if results_file is not None:
        try:  # before hours of training, not after the first iteration
            results_file.open("a", encoding="utf-8").close()
        except OSError as exc:
            raise UserError(f"--results {results_file}: cannot append there ({exc.strerror})") from None
    pool_data = load_examples([pool]).examples
    seed_examples = load_examples([seed_data]).examples
    dev_examples = load_examples([dev]).examples
    eval_examples = load_examples([eval_data]).examples if eval_data else None

    _setup_logging()
    from guardloop.trainer.finetune import FineTuneConfig
    from guardloop.trainer.simulate import Simulation, append_result_line, llm_variation_maker, stratified_split
    from guardloop.trainer.variations import VariationGenerator

    settings = load_settings().model_copy(update={"llm_variations": max(variations, 1)})
    results = []
    with VariationGenerator.from_settings(settings) if variations else contextlib.nullcontext() as generator:
        for seed_value in seeds:
            pool_part, held_out = (
                (pool_data, eval_examples) if eval_examples else stratified_split(pool_data, eval_fraction, seed_value)
            )
            for name in strategies:
                sim = Simulation(
                    pool=pool_part,
                    seed_data=seed_examples,
                    dev=dev_examples,
                    eval_data=held_out,
                    strategy=name,
                    iterations=iterations,
                    per_iteration=per_iteration,
                    make_variations=(
                        llm_variation_maker(generator, settings.data_dir / "cache" / "simulation-variations.jsonl")
                        if generator
                        else None
                    ),
                    cache_dir=settings.data_dir / "cache",
                    config=FineTuneConfig(seed=seed_value, epochs=epochs, patience=2, group_by_length=True),
                    n_clusters=clusters,
                )

                def show(run: Any, it: Any, _name: str = name, _seed: int = seed_value) -> None:
                    if results_file is not None:
                        append_result_line(results_file, _name, _seed, run.baseline_macro_f1, it)
                    typer.echo(
                        f"{_name:<8} seed {_seed:<4} it {it.iteration}: labels "
                        + " ".join(f"{n}" for n in it.acquired.values())
                        + f" (std {it.std_labels:.1f}; with variations std {it.std_with_variations:.1f}, "
                        f"{it.variations_accepted} new variations)  eval macro-F1 {it.eval_macro_f1:.4f}  "
                        f"{it.seconds:.0f}s",
                        err=True,
                    )

                results.append(sim.run(on_iteration=show).as_dict())
    if as_json:
        typer.echo(json.dumps({"runs": results, "labels": list(LABELS)}))
        return
    from guardloop.trainer.simulate import summarize

    _print_simulation_table(summarize([{**it, **run} for run in results for it in run["iterations"]]))


def _print_simulation_table(rows: list[dict[str, Any]]) -> None:
    labels = " ".join(f"{label[:5]:>6}" for label in LABELS)
    typer.echo(f"{'strategy':<9}{'it':>3}{'seeds':>7}  {labels}{'std':>7}{'std+var':>8}{'base F1':>9}{'F1':>8}{'±':>6}")
    for row in rows:
        counts = " ".join(f"{row['acquired'][label]:>6.1f}" for label in LABELS)
        typer.echo(
            f"{row['strategy']:<9}{row['iteration']:>3}{len(row['seeds']):>7}  {counts}{row['std_labels']:>7.1f}"
            f"{row['std_with_variations']:>8.1f}{100 * row['baseline_macro_f1']:>9.1f}"
            f"{100 * row['eval_macro_f1']:>8.1f}{100 * row['eval_macro_f1_sd']:>6.1f}"
        )


@app.command("simulate-report")
@friendly_errors
def simulate_report(
    results_files: Annotated[list[Path], typer.Argument(help="JSON-lines files written by simulate --results")],
) -> None:
    """Mean over seeds, per strategy and iteration, of runs recorded with `simulate --results`."""
    from guardloop.trainer.simulate import read_result_lines, summarize

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
    _print_simulation_table(summarize(lines))


# --------------------------------------------------------------------------------------------- models
def _registry() -> Any:
    from guardloop.models.registry import ModelRegistry

    return ModelRegistry(load_settings().registry_dir)


@models_app.command("list")
@friendly_errors
def models_list() -> None:
    """Published versions, oldest first; * marks the current one."""
    registry = _registry()
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
    registry = _registry()
    version = version or registry.current()
    if version is None:
        raise UserError("no current model; name a version")
    typer.echo(registry.card(version).model_dump_json(indent=2))


@models_app.command("promote")
@friendly_errors
def models_promote(version: str) -> None:
    """Make VERSION current; running services follow within their poll interval."""
    _registry().promote(version)
    typer.echo(f"current is now {version}")


@models_app.command("rollback")
@friendly_errors
def models_rollback() -> None:
    """Switch current back to the version that was current before."""
    typer.echo(f"current is now {_registry().rollback()}")


# --------------------------------------------------------------------------------------------- variations
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
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
) -> None:
    """Ask the LLM (GUARDLOOP_LLM_*, default: the embedded SmolLM2) for label-preserving variations of labeled rows."""
    from guardloop.trainer.llm_server import LLMServerError
    from guardloop.trainer.variations import VariationGenerator

    _setup_logging()
    for noisy in ("httpx", "httpx2"):  # one line per HTTP request drowns the per-row lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings()
    if k is not None:
        settings = settings.model_copy(update={"llm_variations": k})
    loaded = load_examples(
        [data],
        text_column=_parse_column(text_column),
        label_column=_parse_column(label_column),
        skip_bad_rows=skip_bad_rows,
    )
    for bad in loaded.bad_rows:
        typer.echo(f"skipped {bad.path}:{bad.line}: {bad.reason}", err=True)
    rows = [(ex.text, ex.label or "") for ex in loaded.examples[:limit]]
    if not rows:
        raise UserError(f"{data}: no labeled rows")
    predict_proba, model_version = None, None
    if consistency:
        predict_proba, model_version = _current_model_predict_proba(settings)
        if predict_proba is None:
            typer.echo("no current model in the registry: consistency filter off", err=True)
    try:
        with VariationGenerator.from_settings(settings, predict_proba=predict_proba) as generator:
            batch = generator.generate_many(rows)
            endpoint, llm_model = generator.endpoint, generator.model
    except LLMServerError as exc:
        raise UserError(str(exc).splitlines()[0]) from exc
    stats = batch.stats
    if as_json:
        summary = {"endpoint": endpoint, "model": llm_model, "consistency_model": model_version}
        items = [result.as_dict() for result in batch.results]
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


def _current_model_predict_proba(settings: Settings) -> tuple[Any, str | None]:
    """The registry's current model as predict_proba (texts -> (n, 6)), or (None, None) with no current model."""
    from guardloop.models.onnx_model import OnnxClassifier
    from guardloop.models.registry import ModelRegistry

    registry = ModelRegistry(settings.registry_dir)
    version = registry.current()
    if version is None:
        return None, None
    classifier = OnnxClassifier(
        registry.path(version),
        version=version,
        thresholds=registry.card(version).thresholds,
        threads=1,
        max_seq_len=settings.max_seq_len,
    )
    return classifier.predict_proba, version


# --------------------------------------------------------------------------------------------- bench
@bench_app.command("classify")
@friendly_errors
def bench_classify(
    url: Annotated[str, typer.Option(help="base URL of a running service")] = "http://127.0.0.1:8000",
    requests: Annotated[int, typer.Option(min=10, help="requests per measurement")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1)] = 32,
    reference: Annotated[bool, typer.Option(help="also time the in-process transformers pipeline")] = True,
    api_key: Annotated[str | None, typer.Option(envvar="GUARDLOOP_BENCH_API_KEY")] = None,
) -> None:
    """HTTP latency (concurrency 1) and throughput (concurrency N) beside a transformers pipeline on torch."""
    from guardloop.bench.classify import run_classify_bench

    run_classify_bench(url, requests=requests, concurrency=concurrency, reference=reference, api_key=api_key)


@bench_app.command("soak")
@friendly_errors
def bench_soak(
    seconds: Annotated[float, typer.Option(min=5, help="length of the phase with hot-swaps")] = 60,
    baseline_seconds: Annotated[float, typer.Option(min=5, help="length of the no-swap phase before it")] = 60,
    rate: Annotated[float, typer.Option(min=1, help="/classify requests per second (open loop)")] = 50,
    swap_every: Annotated[float, typer.Option(min=0.5, help="seconds between two hot-swaps")] = 5,
    interval: Annotated[float, typer.Option(min=1, help="seconds per printed row")] = 5,
    memory_bound_mb: Annotated[float, typer.Option(help="largest memory growth after warm-up that passes")] = 50,
    registry_dir: Annotated[Path | None, typer.Option(help="whose current model to run (default: settings)")] = None,
) -> None:
    """Steady load from a second process while models are hot-swapped and a reviewer labels: requests, errors,
    p50/p99 and memory over time, a no-swap baseline first. Exit 1 when a target is missed."""
    from guardloop.bench.soak import run_soak_bench

    settings = load_settings()
    met = run_soak_bench(
        settings=settings,
        registry_dir=registry_dir or settings.registry_dir,
        seconds=seconds,
        baseline_seconds=baseline_seconds,
        rate=rate,
        swap_every=swap_every,
        interval=interval,
        memory_bound_mb=memory_bound_mb,
    )
    if not met:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------- pool, reviewers
pool_app = typer.Typer(help="The pool of uncertain traffic: stats, export, purge.", no_args_is_help=True)
reviewers_app = typer.Typer(help="Reviewer accounts for /review: add, list, rotate, revoke.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
app.add_typer(reviewers_app, name="reviewers")


def _database() -> Any:
    """The configured database (GUARDLOOP_DATABASE_URL, else <data_dir>/guardloop.db), migrated."""
    from guardloop.storage import Database

    database = Database(load_settings().database_url_value)
    database.ensure_schema()
    return database


@pool_app.command("stats")
@friendly_errors
def pool_stats(as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """How many items the pool holds, why they were kept, how many are requested and labeled."""
    from guardloop.storage import PoolRepository

    stats = PoolRepository(_database()).stats()
    if as_json:
        typer.echo(json.dumps(stats.as_json()))
        return
    typer.echo(f"items            {stats.items} ({stats.seen_total} sightings)")
    typer.echo(f"  uncertain      {stats.uncertain_items}")
    typer.echo(f"  random sample  {stats.sampled_items}")
    typer.echo(f"requested        {stats.requested_items}")
    typer.echo(f"labeled          {stats.labeled_items}")
    typer.echo(f"first seen       {stats.oldest_first_seen or '-'}")
    typer.echo(f"last seen        {stats.newest_last_seen or '-'}")
    for label, count in sorted(stats.by_label.items()):
        typer.echo(f"  predicted {label:<22}{count:>8}")


@pool_app.command("export")
@friendly_errors
def pool_export(
    export_format: Annotated[str, typer.Option("--format", help="jsonl (one JSON object per line)")] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
    requested_only: Annotated[bool, typer.Option(help="only items requested for labeling")] = False,
) -> None:
    """Every pool item with its text, prediction, scores, counts and request reason."""
    import os
    import tempfile

    from guardloop.storage import PoolRepository

    if export_format != "jsonl":
        raise UserError(f"unsupported format {export_format!r}; use --format jsonl")
    rows = PoolRepository(_database()).export(requested_only=requested_only)
    if output is None:
        count = 0
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
            count += 1
        typer.echo(f"exported {count} items", err=True)
        return
    if output.parent and not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such directory")
    # Written next to the target and renamed into place: a failed export leaves no half file.
    fd, tmp_name = tempfile.mkstemp(dir=output.parent or Path("."), prefix=f".{output.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    typer.echo(f"exported {count} items to {output}", err=True)


@pool_app.command("purge")
@friendly_errors
def pool_purge(
    older_than_days: Annotated[
        float | None, typer.Option(min=0, help="age in days (default: the pool_retention_days setting)")
    ] = None,
    include_labeled: Annotated[bool, typer.Option(help="also delete labeled items (the training set)")] = False,
) -> None:
    """Delete items not seen for the retention period; labeled items stay unless --include-labeled."""
    from datetime import UTC, datetime, timedelta

    from guardloop.storage import PoolRepository

    days = load_settings().pool_retention_days if older_than_days is None else older_than_days
    cutoff = datetime.now(UTC) - timedelta(days=days)
    purged = PoolRepository(_database()).purge(older_than=cutoff, include_labeled=include_labeled)
    typer.echo(f"purged {purged} items not seen since {cutoff:%Y-%m-%d %H:%M} UTC")


@reviewers_app.command("add")
@friendly_errors
def reviewers_add(name: Annotated[str, typer.Argument(help="the reviewer's name (letters, digits, . _ @ -)")]) -> None:
    """Create a reviewer and print their token once; only its hash is stored."""
    from guardloop.storage import ReviewerRepository

    token = ReviewerRepository(_database()).add(name)
    typer.echo(token)
    typer.echo(f"reviewer {name} added; the token above is shown only now: hand it over privately", err=True)


@reviewers_app.command("rotate")
@friendly_errors
def reviewers_rotate(name: str) -> None:
    """Give a reviewer a new token (the old one stops working); prints it once."""
    from guardloop.storage import ReviewerRepository

    token = ReviewerRepository(_database()).rotate(name)
    typer.echo(token)
    typer.echo(f"new token for {name}; the old one no longer works", err=True)


@reviewers_app.command("revoke")
@friendly_errors
def reviewers_revoke(name: str) -> None:
    """Stop a reviewer's token from working (their labels stay)."""
    from guardloop.storage import ReviewerRepository

    ReviewerRepository(_database()).revoke(name)
    typer.echo(f"revoked {name}")


@reviewers_app.command("list")
@friendly_errors
def reviewers_list() -> None:
    """Reviewers and whether their token works (tokens are never shown again)."""
    from guardloop.storage import ReviewerRepository

    reviewers = ReviewerRepository(_database()).list()
    if not reviewers:
        typer.echo("no reviewers; add one with `guardloop reviewers add NAME`")
    for reviewer in reviewers:
        state = f"revoked {reviewer.revoked_at:%Y-%m-%d}" if reviewer.revoked_at else "active"
        typer.echo(f"{reviewer.name:<32} added {reviewer.created_at:%Y-%m-%d %H:%M}  {state}")


@bench_app.command("pool")
@friendly_errors
def bench_pool(
    calls: Annotated[int, typer.Option(min=10, help="timed /classify calls per service (pool on, pool off)")] = 10_000,
    database_url: Annotated[
        str | None, typer.Option(help="an empty PostgreSQL database (default: a fresh SQLite file in a temp dir)")
    ] = None,
    registry_dir: Annotated[Path | None, typer.Option(help="model registry (default: settings)")] = None,
    distinct_share: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of calls with a new text")] = 0.6,
    seed: Annotated[int, typer.Option(help="seed of the text mix")] = 13,
    uncertainty_threshold: Annotated[
        float | None, typer.Option(min=0, max=1, help="pool above this normalized entropy (default: settings)")
    ] = None,
    sample_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="share of confident calls pooled (default: settings)")
    ] = None,
) -> None:
    """/classify p50/p99 with pool logging on vs off (two services, calls interleaved), then the pool's contents."""
    from guardloop.bench.pool import run_pool_bench

    settings = load_settings()
    overrides = {"pool_uncertainty_threshold": uncertainty_threshold, "pool_sample_rate": sample_rate}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    run_pool_bench(
        calls=calls,
        database_url=database_url,
        registry_dir=registry_dir or settings.registry_dir,
        distinct_share=distinct_share,
        seed=seed,
        settings=settings,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
