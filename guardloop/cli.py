"""`guardloop`: one command line for every job (serve, train, eval, models, bench, ...).

User errors end with one readable line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from guardloop.datafiles import DataFileError, load_examples
from guardloop.labels import LABELS
from guardloop.settings import Settings

app = typer.Typer(
    help="guardloop: a safety classifier that keeps learning from the traffic it guards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry: list, inspect, promote, roll back.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")

SEED_DIR = Path(__file__).parent / "seed"
F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Anything the user can fix; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from models.onnx_model import ModelLoadError
    from models.registry import RegistryError

    errors: list[type[BaseException]] = [UserError, DataFileError, RegistryError, ModelLoadError, ValidationError]
    try:
        from trainer.base_models import BaseModelMissing

        errors.append(BaseModelMissing)
    except ImportError:  # serve-only install: no trainer dependencies
        pass
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
) -> None:
    """Serve POST /classify; with an empty registry, first train a bootstrap model from the seed data."""
    import uvicorn

    from models.registry import ModelRegistry
    from service.app import create_app

    _setup_logging()
    settings = load_settings()
    registry = ModelRegistry(settings.registry_dir)
    if registry.current() is None and bootstrap:
        typer.echo("no model in the registry yet: training a bootstrap model from the seed data", err=True)
        _train(settings, [SEED_DIR / "train.jsonl"], SEED_DIR / "eval.jsonl", progress=True)
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info")


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
    from models.registry import ModelRegistry
    from trainer.finetune import FineTuneConfig
    from trainer.train import TrainJob, train_and_publish

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
    from models.onnx_model import OnnxClassifier
    from models.registry import ModelRegistry
    from trainer.metrics import classification_report

    settings = load_settings()
    loaded = load_examples(
        data,
        text_column=_parse_column(text_column),
        label_column=_parse_column(label_column),
        skip_bad_rows=skip_bad_rows,
    )
    registry = ModelRegistry(settings.registry_dir)
    version = model or registry.current()
    if version is None:
        raise UserError(f"no current model in {settings.registry_dir}; train one or pass --model VERSION")
    card = registry.card(version)
    classifier = OnnxClassifier(
        registry.path(version), version=version, thresholds=card.thresholds, threads=2, max_seq_len=settings.max_seq_len
    )
    texts = [ex.text for ex in loaded.examples]
    preds: list[str] = []
    for start in range(0, len(texts), 64):
        preds += [LABELS[i] for i in classifier.predict_proba(texts[start : start + 64]).argmax(axis=1)]
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
    import numpy as np

    from models.onnx_model import OnnxClassifier
    from models.registry import ModelRegistry
    from trainer.calibrate import CalibrationError, calibrate_thresholds, parse_targets, publish_calibrated

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
    registry = ModelRegistry(settings.registry_dir)
    version = model or registry.current()
    if version is None:
        raise UserError(f"no current model in {settings.registry_dir}; train one or pass --model VERSION")
    card = registry.card(version)
    classifier = OnnxClassifier(
        registry.path(version), version=version, thresholds=card.thresholds, threads=2, max_seq_len=settings.max_seq_len
    )
    texts = [ex.text for ex in loaded.examples]
    probs = np.concatenate([classifier.predict_proba(texts[i : i + 64]) for i in range(0, len(texts), 64)])
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
        registry,
        version,
        results,
        data_fingerprints=loaded.fingerprints,
        n_examples=len(texts),
        make_current=promote,
    )
    typer.echo(f"published {new_version} (parent {version}){' as current' if promote else ''}", err=True)
    typer.echo(new_version)


# --------------------------------------------------------------------------------------------- models
def _registry() -> Any:
    from models.registry import ModelRegistry

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
    from trainer.llm_server import LLMServerError
    from trainer.variations import VariationGenerator

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
    from models.onnx_model import OnnxClassifier
    from models.registry import ModelRegistry

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
    from guardloop.bench import run_classify_bench

    run_classify_bench(url, requests=requests, concurrency=concurrency, reference=reference, api_key=api_key)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
