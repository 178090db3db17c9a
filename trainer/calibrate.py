"""Per-category threshold calibration on a labeled file, written into the model card of a new version.

A category is flagged when its own score reaches its own threshold (one-vs-rest, see
`OnnxClassifier.verdict`), so each threshold is tuned one-vs-rest on that category's score:

- target precision P: the lowest threshold whose precision on the data is >= P (the most recall that
  precision allows);
- target recall R: the highest threshold whose recall on the data is >= R (the most precision that
  recall allows);
- hold precision P (`--hold-precision`, for every harmful category without a target of its own): keep the
  threshold when its precision on the data is already >= P, else raise it to the lowest threshold above it
  that reaches P. It never loosens a threshold: it is a floor under the categories one is not tuning.

The usual use: `--target-recall self-harm=0.95 --target-recall emergency-situation=0.9 --hold-precision 0.8`,
the critical categories as sensitive as their targets ask, the advice categories no noisier than 0.8.
Flagging is one-vs-rest, so a low self-harm threshold cannot change which texts are flagged medical-advice;
what it costs is self-harm flags on other categories' texts (and, as guidance is ordered by severity, their
self-harm guidance first). So the card records, at the published thresholds, every harmful category's expected
precision and recall on the file, which other categories' texts each critical category also flags, and the
critical miss rate.

A category without examples in the file, or whose target no threshold reaches, keeps its threshold; a held
category whose precision no threshold reaches stops the calibration (`HoldError`): a floor that silently did
not hold would publish the noise it was asked to prevent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from guardloop.models.registry import ModelCard, ModelRegistry
from guardloop.trainer.eval_report import CRITICAL_LABELS, critical_misses
from sklearn.metrics import precision_recall_curve

from guardloop.core.labels import HARMFUL_LABELS, LABELS, SAFE_LABEL, UnknownLabelError, parse_label

Metric = Literal["precision", "recall", "hold-precision"]


class CalibrationError(ValueError):
    """Targets that cannot be used as given; the message says what to fix."""


class HoldError(CalibrationError):
    """A held category whose precision no threshold at or above its own reaches."""


@dataclass(frozen=True)
class Target:
    metric: Metric
    value: float


@dataclass(frozen=True)
class ClassCalibration:
    label: str
    target: Target
    previous: float
    threshold: float  # the new threshold; equals `previous` when not reached
    reached: bool
    precision: float | None  # on the data, at `threshold`
    recall: float | None
    support: int  # examples of this label in the data
    note: str = ""


def parse_targets(precision: Sequence[str], recall: Sequence[str], *, allow_none: bool = False) -> dict[str, Target]:
    """Targets per harmful label from `--target-precision` / `--target-recall` values (none: an error unless
    `allow_none`, for `--hold-precision` alone).

    Each value is either a number (every harmful label not named elsewhere) or `LABEL=NUMBER`.
    """
    named: dict[str, Target] = {}
    default: Target | None = None
    for metric, values in (("precision", precision), ("recall", recall)):
        for raw in values:
            label_part, sep, number_part = raw.rpartition("=")
            try:
                value = float(number_part)
            except ValueError:
                raise CalibrationError(
                    f"--target-{metric} {raw!r}: expected a number such as 0.9, or LABEL=NUMBER"
                ) from None
            if not 0.0 < value <= 1.0:
                raise CalibrationError(f"--target-{metric} {raw!r}: the target must lie in (0, 1]")
            target = Target(metric, value)  # type: ignore[arg-type]
            if not sep:
                if default is not None:
                    raise CalibrationError(
                        "give one target for all categories (a bare number) at most once; name the others LABEL=NUMBER"
                    )
                default = target
                continue
            try:
                label = parse_label(label_part)
            except UnknownLabelError as exc:
                raise CalibrationError(f"--target-{metric} {raw!r}: {exc}") from None
            if label == SAFE_LABEL:
                raise CalibrationError(f"{SAFE_LABEL!r} is never flagged and takes no threshold; leave it out")
            if label in named:
                raise CalibrationError(f"{label!r} has two targets; give each category one")
            named[label] = target
    targets = {label: default for label in HARMFUL_LABELS if default is not None} | named
    if not targets and not allow_none:
        raise CalibrationError("give --target-precision P or --target-recall R (or LABEL=VALUE)")
    return targets


def with_hold(targets: dict[str, Target], hold_precision: float | None) -> dict[str, Target]:
    """`targets` plus a hold-precision floor for every harmful label without a target of its own."""
    if hold_precision is None:
        return targets
    if not 0.0 < hold_precision <= 1.0:
        raise CalibrationError(f"--hold-precision {hold_precision}: the precision must lie in (0, 1]")
    if set(targets) == set(HARMFUL_LABELS):
        raise CalibrationError(
            "--hold-precision holds the categories without a target, and every category has one (a bare "
            "--target-precision/--target-recall targets all); name the targeted categories LABEL=VALUE instead"
        )
    hold = Target("hold-precision", hold_precision)
    return {label: targets.get(label, hold) for label in HARMFUL_LABELS}


def _hold(
    label: str, target: Target, before: float, scores: np.ndarray, positives: np.ndarray, support: int
) -> ClassCalibration:
    """Keep `before` when its precision reaches the floor, else the lowest higher threshold that does."""
    flagged = scores >= before
    if not flagged.any() or (flagged & positives).sum() / flagged.sum() >= target.value:
        precision, recall = _at(scores, positives, before)
        return ClassCalibration(label, target, before, before, True, precision, recall, support)
    precision, recall, thresholds = precision_recall_curve(positives, scores)
    candidates = np.flatnonzero((precision[:-1] >= target.value) & (thresholds >= before))
    if not candidates.size:
        raise HoldError(
            f"{label}: precision {(flagged & positives).sum() / flagged.sum():.3f} at its threshold {before:.3f} and "
            f"no higher threshold reaches --hold-precision {target.value}; nothing published (lower the hold or "
            f"give {label} its own target)"
        )
    index = int(candidates[0])
    return ClassCalibration(
        label, target, before, float(thresholds[index]), True, float(precision[index]), float(recall[index]), support
    )


def _at(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """(precision, recall) of flagging `scores >= threshold`; None where undefined (nothing flagged / no gold)."""
    flagged = scores >= threshold
    tp = int((flagged & positives).sum())
    return (tp / int(flagged.sum()) if flagged.any() else None, tp / int(positives.sum()) if positives.any() else None)


def expected_at(probs: np.ndarray, y_true: Sequence[str], thresholds: dict[str, float]) -> dict[str, Any]:
    """What `thresholds` should do on data like this file, by the served rule (a category is flagged when its own
    score reaches its own threshold): each harmful category's precision and recall, the other categories' texts
    each critical category also flags, and the critical miss rate."""
    truth = np.asarray(y_true)
    flags = {label: probs[:, LABELS.index(label)] >= thresholds.get(label, 0.5) for label in HARMFUL_LABELS}
    per_class: dict[str, Any] = {}
    for label, flagged in flags.items():
        positives = truth == label
        precision, recall = _at(probs[:, LABELS.index(label)], positives, thresholds.get(label, 0.5))
        per_class[label] = {
            "threshold": thresholds.get(label, 0.5),
            "precision": precision,
            "recall": recall,
            "support": int(positives.sum()),
            "flagged": int(flagged.sum()),
        }
        if label in CRITICAL_LABELS:
            others = truth[flagged & ~positives]
            per_class[label]["also_flags"] = {other: int((others == other).sum()) for other in LABELS if other != label}
    any_flag = np.logical_or.reduce(list(flags.values()))
    return {"per_class": per_class, "critical_misses": critical_misses(y_true, any_flag.tolist())}


def calibrate_thresholds(
    probs: np.ndarray, y_true: Sequence[str], previous: dict[str, float], targets: dict[str, Target]
) -> list[ClassCalibration]:
    """One calibration per label in `targets`; `probs` has one row per example, columns in LABELS order."""
    truth = np.asarray(y_true)
    results = []
    for label in (label for label in HARMFUL_LABELS if label in targets):
        target, before = targets[label], previous.get(label, 0.5)
        positives = truth == label
        support = int(positives.sum())
        if support == 0:
            results.append(
                ClassCalibration(label, target, before, before, False, None, None, 0, f"no example labeled {label}")
            )
            continue
        if target.metric == "hold-precision":
            results.append(_hold(label, target, before, probs[:, LABELS.index(label)], positives, support))
            continue
        precision, recall, thresholds = precision_recall_curve(positives, probs[:, LABELS.index(label)])
        # The curve's last point (precision 1, recall 0) has no threshold; thresholds ascend.
        precision, recall = precision[:-1], recall[:-1]
        if target.metric == "precision":
            candidates = np.flatnonzero(precision >= target.value)
            index = int(candidates[0]) if candidates.size else None  # lowest threshold: most recall
            best = f"{precision.max():.3f}"
        else:
            candidates = np.flatnonzero(recall >= target.value)
            index = int(candidates[-1]) if candidates.size else None  # highest threshold: most precision
            best = f"{recall.max():.3f}"
        if index is None:
            note = f"no threshold reaches {target.metric} {target.value} (best {best}); kept {before}"
            results.append(ClassCalibration(label, target, before, before, False, None, None, support, note))
            continue
        results.append(
            ClassCalibration(
                label,
                target,
                before,
                float(thresholds[index]),
                True,
                float(precision[index]),
                float(recall[index]),
                support,
            )
        )
    return results


def calibrated_thresholds(previous: dict[str, float], calibrations: list[ClassCalibration]) -> dict[str, float]:
    """The thresholds a calibration publishes: the reached ones replace their old values."""
    return previous | {c.label: c.threshold for c in calibrations if c.reached}


def publish_calibrated(
    registry: ModelRegistry,
    version: str,
    calibrations: list[ClassCalibration],
    *,
    expected: dict[str, Any] | None = None,
    data_fingerprints: dict[str, str],
    n_examples: int,
    make_current: bool = True,
) -> str:
    """Publish `version`'s files again as a new version whose card holds the calibrated thresholds.

    Why a new version rather than rewriting card.json in place: published versions are immutable, so
    what a version name scored yesterday it scores today; running services only reload when the
    `current` pointer moves, so an in-place edit would not reach them; and `guardloop models rollback`
    undoes a bad calibration like any other change. The cost is one copy of the model files.
    """
    card = registry.card(version)
    record: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(),
        "from_version": version,
        "n": n_examples,
        "data": data_fingerprints,
        "per_class": {c.label: asdict(c) | {"target": asdict(c.target)} for c in calibrations},
        # At the published thresholds, every harmful category (see `expected_at`).
        "expected": expected,
    }
    new_card = ModelCard.model_validate(
        card.model_dump()
        | {
            "version": registry.new_version_name(),
            "created_at": datetime.now(UTC),
            "parent": version,
            "thresholds": calibrated_thresholds(card.thresholds, calibrations),
            "metrics": card.metrics | {"calibration": record},
        }
    )
    return registry.publish(registry.path(version), new_card, make_current=make_current)
