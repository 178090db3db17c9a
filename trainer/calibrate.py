"""Per-category threshold calibration on a labeled file, written into the model card of a new version.

A category is flagged when its own score reaches its own threshold (one-vs-rest, see
`OnnxClassifier.verdict`), so each threshold is tuned one-vs-rest on that category's score:

- target precision P: the lowest threshold whose precision on the data is >= P (the most recall that
  precision allows);
- target recall R: the highest threshold whose recall on the data is >= R (the most precision that
  recall allows).

A category without examples in the file, or whose target no threshold reaches, keeps its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from guardloop.models.registry import ModelCard, ModelRegistry
from sklearn.metrics import precision_recall_curve

from guardloop.core.labels import HARMFUL_LABELS, LABELS, SAFE_LABEL, UnknownLabelError, parse_label

Metric = Literal["precision", "recall"]


class CalibrationError(ValueError):
    """Targets that cannot be used as given; the message says what to fix."""


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


def parse_targets(precision: Sequence[str], recall: Sequence[str]) -> dict[str, Target]:
    """Targets per harmful label from `--target-precision` / `--target-recall` values.

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
    if not targets:
        raise CalibrationError("give --target-precision P or --target-recall R (or LABEL=VALUE)")
    return targets


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


def publish_calibrated(
    registry: ModelRegistry,
    version: str,
    calibrations: list[ClassCalibration],
    *,
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
    reached = [c for c in calibrations if c.reached]
    record: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(),
        "from_version": version,
        "n": n_examples,
        "data": data_fingerprints,
        "per_class": {c.label: asdict(c) | {"target": asdict(c.target)} for c in calibrations},
    }
    new_card = ModelCard.model_validate(
        card.model_dump()
        | {
            "version": registry.new_version_name(),
            "created_at": datetime.now(UTC),
            "parent": version,
            "thresholds": card.thresholds | {c.label: c.threshold for c in reached},
            "metrics": card.metrics | {"calibration": record},
        }
    )
    return registry.publish(registry.path(version), new_card, make_current=make_current)
