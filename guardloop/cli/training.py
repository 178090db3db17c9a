"""`guardloop train`, `guardloop eval`, `guardloop calibrate`: a model from files, its numbers, its thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from guardloop.cli.app import app, friendly_errors, load_labeled, load_settings, parse_column, report_bad_rows
from guardloop.core.datafiles import load_examples
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelCard, ModelRegistry, open_classifier


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
    columns = {"text_column": parse_column(text_column), "label_column": parse_column(label_column)}
    train_data = load_examples(data, skip_bad_rows=skip_bad_rows, **columns)
    dev_data = load_examples([dev], skip_bad_rows=skip_bad_rows, **columns) if dev else None
    unlabeled_texts = []
    if unlabeled:
        loaded = load_examples(
            unlabeled, require_labels=False, skip_bad_rows=skip_bad_rows, text_column=columns["text_column"]
        )
        unlabeled_texts = [ex.text for ex in loaded.examples]
    report_bad_rows([*train_data.bad_rows, *(dev_data.bad_rows if dev_data else [])])
    # The train extra (torch, transformers), imported only after the data has been checked: bad input fails fast,
    # and a serve-only install still runs every other command.
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


def open_version(settings: Settings, model: str | None) -> tuple[str, ModelCard, OnnxClassifier]:
    """(version, card, classifier) of `model`, or of the current version."""
    registry = ModelRegistry(settings.registry_dir)
    version = model or registry.current()
    if version is None:
        raise UserError(f"no current model in {settings.registry_dir}; train one or pass --model VERSION")
    classifier = open_classifier(registry, version, max_seq_len=settings.max_seq_len)
    return version, registry.card(version), classifier


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
    # scikit-learn's metrics come with the train extra.
    from guardloop.trainer.evaluation import evaluate as evaluate_model

    settings = load_settings()
    loaded = load_labeled(data, text_column, label_column, skip_bad_rows)
    version, _, classifier = open_version(settings, model)
    report = evaluate_model(classifier, loaded.examples) | {"model_version": version}
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"model {version} on {len(loaded.examples)} texts")
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
    # scikit-learn's precision-recall curve comes with the train extra.
    from guardloop.trainer.calibrate import CalibrationError, calibrate_thresholds, parse_targets, publish_calibrated

    try:
        targets = parse_targets(target_precision or [], target_recall or [])
    except CalibrationError as exc:
        raise UserError(str(exc)) from None
    settings = load_settings()
    loaded = load_labeled(data, text_column, label_column, skip_bad_rows)
    version, card, classifier = open_version(settings, model)
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
