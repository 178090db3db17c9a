"""The promotion gate: a candidate replaces the current model only if it is not meaningfully worse.

Macro-F1 may drop by at most `max_f1_drop` and no class's recall by more than `max_recall_drop`: a rare class
(self-harm, emergencies) must not be traded away for a better average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardloop.core.labels import LABELS


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(
    candidate: dict[str, Any], current: dict[str, Any] | None, *, max_f1_drop: float, max_recall_drop: float
) -> GateDecision:
    """Promote only if macro-F1 drops by at most `max_f1_drop` and no class's recall by more than `max_recall_drop`."""
    if current is None:
        return GateDecision(True, "no current model to compare with")
    f1_drop = current["macro_f1"] - candidate["macro_f1"]
    if f1_drop > max_f1_drop:
        return GateDecision(
            False,
            f"macro-F1 {candidate['macro_f1']:.4f} vs current {current['macro_f1']:.4f}: "
            f"drop {f1_drop:.4f} > allowed {max_f1_drop:.4f}",
        )
    for label in LABELS:
        drop = current["per_class_recall"][label] - candidate["per_class_recall"][label]
        if drop > max_recall_drop:
            return GateDecision(
                False,
                f"{label} recall {candidate['per_class_recall'][label]:.4f} vs current "
                f"{current['per_class_recall'][label]:.4f}: drop {drop:.4f} > allowed {max_recall_drop:.4f}",
            )
    return GateDecision(
        True,
        f"macro-F1 {candidate['macro_f1']:.4f} vs current {current['macro_f1']:.4f}; no class recall dropped too far",
    )
