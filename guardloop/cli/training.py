"""`guardloop train`, `guardloop eval`, `guardloop calibrate`: a model from files, its numbers, its thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from guardloop.cli.app import app, friendly_errors, load_labeled, load_settings, parse_column, report_bad_rows
from guardloop.cli.tenant_calibrate import finish_tenant, tenant_inputs
from guardloop.core.datafiles import load_examples
from guardloop.core.errors import UserError
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelCard, ModelRegistry, open_classifier
from guardloop.trainer.base_models import student_dir, teacher_dir


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
    from guardloop.trainer.train import TEACHER_EPOCHS, TrainJob, train_and_publish

    teacher = config_overrides.pop("teacher", None)
    teacher_epochs = config_overrides.pop("teacher_epochs", None) or TEACHER_EPOCHS
    base_model = config_overrides.pop("base_model", None)
    average_of = config_overrides.pop("average_of", None) or 1
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
        base_model=base_model,
        average_of=average_of,
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
    base_model: Annotated[
        Path | None,
        typer.Option(help="student: a local Hugging Face encoder directory (default: settings, else all-MiniLM-L6-v2)"),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="distill from a teacher: 'mpnet' (all-mpnet-base-v2) or a local Hugging Face encoder directory"
        ),
    ] = None,
    teacher_epochs: Annotated[
        int | None, typer.Option(min=1, help="the teacher's most epochs (default 10; early stopping on --dev)")
    ] = None,
    unlabeled: Annotated[list[Path] | None, typer.Option(help="unlabeled texts for the teacher to soft-label")] = None,
    average_of: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="fine-tune the student N times from one start and serve the weight average (N x the time; "
            "default: settings)",
        ),
    ] = None,
) -> None:
    """Fine-tune the student (all-MiniLM-L6-v2 or --base-model), export int8 ONNX, verify it against torch, publish
    it as current."""
    settings = load_settings()
    base_model = base_model or settings.base_model
    teacher = teacher or settings.teacher
    average_of = average_of or settings.train_average_of
    if unlabeled and not teacher:
        raise UserError("--unlabeled needs --teacher: only a teacher can learn from unlabeled texts")
    # An operator's directories are checked before the data is read and anything trains.
    student_dir(base_model, option="--base-model")
    if teacher is not None:
        teacher_dir(teacher, settings.data_dir / "cache", option="--teacher")
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
        base_model=base_model,
        average_of=average_of,
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
    plot: Annotated[
        Path | None, typer.Option(help="write per-class precision-recall curves (thresholds marked) to this PNG")
    ] = None,
    seed: Annotated[int, typer.Option(help="random state of the bootstrap intervals")] = 0,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
) -> None:
    """Accuracy, macro precision/recall/F1, per-class F1 with bootstrap 95% intervals, the confusion matrix and
    the critical miss rate of a served (ONNX) model."""
    # scikit-learn's metrics come with the train extra.
    from guardloop.trainer.eval_report import RESAMPLES, check_plot_path, extended_report, plot_pr_curves
    from guardloop.trainer.evaluation import report_from_probs, served_probs

    if plot is not None:
        try:
            check_plot_path(plot)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    settings = load_settings()
    loaded = load_labeled(data, text_column, label_column, skip_bad_rows)
    version, _, classifier = open_version(settings, model)
    probs = served_probs(classifier, loaded.examples)
    y_true = [ex.label or "" for ex in loaded.examples]
    report = (
        report_from_probs(loaded.examples, probs)
        | extended_report(y_true, probs, classifier.verdict, resamples=RESAMPLES, random_state=seed)
        | {"model_version": version, "thresholds": dict(classifier.thresholds)}
    )
    if plot is not None:
        plot_pr_curves(y_true, probs, classifier.thresholds, plot, title=f"{version} on {len(y_true)} texts")
        report["plot"] = str(plot)
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
    _echo_extended(report)
    if plot is not None:
        typer.echo(f"precision-recall curves written to {plot}")


def _rate(entry: dict[str, Any]) -> str:
    return "n/a (no such texts)" if entry["rate"] is None else f"{entry['rate']:.4f} ({entry['missed']}/{entry['n']})"


def _echo_extended(report: dict[str, Any]) -> None:
    """The lines `eval` prints after the confusion matrix: critical misses, bootstrap intervals, average precision."""
    misses = report["critical_misses"]
    per_class = ", ".join(f"{label} {_rate(entry)}" for label, entry in misses["per_class"].items())
    typer.echo(f"critical miss rate (gold critical texts flagged as nothing) {_rate(misses)}: {per_class}")
    boot = report["bootstrap"]
    macro = boot["macro_f1"]
    typer.echo(
        f"macro-F1 {macro['estimate']:.4f}, {boot['confidence']:.0%} bootstrap interval "
        f"[{macro['low']:.4f}, {macro['high']:.4f}] ({boot['resamples']} resamples, seed {boot['random_state']})"
    )
    typer.echo(f"{'label':<22}{'F1':>8}{'low':>8}{'high':>8}{'AP':>8}")
    for label in LABELS:
        f1, ap = boot["per_class_f1"][label], report["average_precision"][label]
        typer.echo(
            f"{label:<22}{f1['estimate']:>8.4f}{f1['low']:>8.4f}{f1['high']:>8.4f}"
            + (f"{'-':>8}" if ap is None else f"{ap:>8.4f}")
        )


@app.command()
@friendly_errors
def calibrate(
    data: Annotated[
        list[Path] | None, typer.Option("--data", help="labeled TSV/CSV/JSONL file (repeatable); or --tenant")
    ] = None,
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
    hold_precision: Annotated[
        float | None,
        typer.Option(
            help="for every category without a target: keep its threshold if its precision is >= P, else raise it "
            "to the lowest that reaches P; nothing is published if one cannot"
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="registry version to calibrate (default: current)")] = None,
    promote: Annotated[bool, typer.Option(help="make the calibrated version current")] = True,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
    tenant: Annotated[
        str | None,
        typer.Option(help="tune this tenant's thresholds on its reviewed traffic; prints a policy snippet"),
    ] = None,
    write_policy: Annotated[
        bool, typer.Option(help="with --tenant: also write the thresholds into the policy file (a new version)")
    ] = False,
) -> None:
    """Tune per-category thresholds on a labeled file and publish them as a new version (parent: the old one); or,
    with --tenant, on that tenant's reviewed traffic into its policy."""
    # scikit-learn's precision-recall curve comes with the train extra.
    from guardloop.trainer.calibrate import (
        CalibrationError,
        calibrate_thresholds,
        calibrated_thresholds,
        expected_at,
        parse_targets,
        publish_calibrated,
        with_hold,
    )

    try:
        targets = with_hold(parse_targets(target_precision or [], target_recall or [], allow_none=True), hold_precision)
        if not targets:
            raise CalibrationError(
                "give --target-precision P or --target-recall R (or LABEL=VALUE), or --hold-precision P"
            )
    except CalibrationError as exc:
        raise UserError(str(exc)) from None
    settings = load_settings()
    if tenant is not None and data:
        raise UserError("give --data FILE or --tenant NAME, not both: a tenant is tuned on its own reviewed traffic")
    if tenant is None and not data:
        raise UserError("give --data FILE (labeled examples) or --tenant NAME (its reviewed traffic)")
    if write_policy and tenant is None:
        raise UserError("--write-policy needs --tenant NAME")
    if tenant is not None:
        version, card, classifier = open_version(settings, model)
        inputs = tenant_inputs(settings, tenant, card.thresholds)
        texts, y_true, previous = inputs.texts, inputs.labels, inputs.previous
    else:
        loaded = load_labeled(data or [], text_column, label_column, skip_bad_rows)
        version, card, classifier = open_version(settings, model)
        texts, y_true = [ex.text for ex in loaded.examples], [ex.label or "" for ex in loaded.examples]
        previous = card.thresholds
    probs = classifier.predict_many(texts)
    try:
        results = calibrate_thresholds(probs, y_true, previous, targets)
    except CalibrationError as exc:
        raise UserError(str(exc)) from None
    typer.echo(f"model {version} on {len(texts)} texts")
    typer.echo(f"{'label':<22}{'target':>20}{'threshold':>20}{'P':>8}{'R':>8}{'n':>6}")
    for c in results:
        numbers = "".join(f"{'-' if v is None else f'{v:.3f}':>8}" for v in (c.precision, c.recall))
        change = f"{c.previous:.3f} -> {c.threshold:.3f}" if c.reached else f"{c.previous:.3f} (kept)"
        typer.echo(f"{c.label:<22}{c.target.metric + ' ' + str(c.target.value):>20}{change:>20}{numbers}{c.support:>6}")
        if c.note:
            typer.echo(f"  {c.label}: {c.note}", err=True)
    if not any(c.reached and (c.target.metric != "hold-precision" or c.threshold != c.previous) for c in results):
        raise UserError("no threshold was calibrated (see above); nothing published")
    expected = expected_at(probs, y_true, calibrated_thresholds(previous, results))
    _echo_expected(expected)
    if tenant is not None:
        calibrated = {c.label: c.threshold for c in results if c.reached and c.threshold != c.previous}
        finish_tenant(settings, tenant, inputs, calibrated, version, write_policy)
        return
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
        expected=expected,
        data_fingerprints=loaded.fingerprints,
        n_examples=len(texts),
        make_current=promote,
    )
    typer.echo(f"published {new_version} (parent {version}){' as current' if promote else ''}", err=True)
    typer.echo(new_version)


def _echo_expected(expected: dict[str, Any]) -> None:
    """Every harmful category's precision and recall on the file at the thresholds about to be published."""
    typer.echo("expected on this file at the published thresholds (a category flags when its score reaches it):")
    typer.echo(f"{'label':<22}{'threshold':>10}{'P':>8}{'R':>8}{'flagged':>9}{'n':>6}  also flags")
    for label, row in expected["per_class"].items():
        p, r = ("-" if v is None else f"{v:.3f}" for v in (row["precision"], row["recall"]))
        also = ", ".join(f"{other} {count}" for other, count in row.get("also_flags", {}).items() if count)
        typer.echo(
            f"{label:<22}{row['threshold']:>10.3f}{p:>8}{r:>8}{row['flagged']:>9}{row['support']:>6}  {also}".rstrip()
        )
    misses = expected["critical_misses"]
    if misses["rate"] is not None:
        typer.echo(f"critical miss rate {misses['rate']:.3f} ({misses['missed']}/{misses['n']})")
