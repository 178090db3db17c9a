"""The promotion gate: a candidate replaces the current model only if it is not meaningfully worse.

Macro-F1 may drop by at most `max_f1_drop` and no class's recall by more than `max_recall_drop`: a rare class
(self-harm, emergencies) must not be traded away for a better average.

"Meaningfully" is decided by a paired bootstrap over the eval items: both models' predictions on the same items
are resampled together, and a drop blocks the candidate only when it exceeds its allowance AND its confidence
interval lies wholly above zero. On a set with 20 items per class one text moves a recall by 0.05, which alone
used to reject a candidate; now a drop must be larger than what resampling the same items produces by chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from guardloop.trainer.eval_report import f1_from_confusions

from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings


@dataclass(frozen=True)
class GateRules:
    max_f1_drop: float
    max_recall_drop: float
    confidence: float = 0.95  # two-sided percentile interval of each drop
    resamples: int = 1000
    random_state: int = 0


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    # Each checked drop (current - candidate) with its interval; what the cycle record shows.
    drops: dict[str, Any] = field(default_factory=dict)


def _confusions(codes: np.ndarray, k: int) -> np.ndarray:
    """Stack of confusion matrices (resamples, K, K) from codes true*K+pred, one row per resample."""
    resamples = codes.shape[0]
    offsets = (np.arange(resamples, dtype=np.int64) * k * k)[:, None]
    return np.bincount((codes + offsets).ravel(), minlength=resamples * k * k).reshape(resamples, k, k)


def _recalls(confusions: np.ndarray) -> np.ndarray:
    support = confusions.sum(axis=-1)
    tp = np.diagonal(confusions, axis1=-2, axis2=-1)
    return np.divide(tp, support, out=np.full(tp.shape, np.nan), where=support > 0)


def paired_drops(
    y_true: Sequence[str],
    candidate: Sequence[str],
    current: Sequence[str],
    *,
    resamples: int,
    confidence: float,
    random_state: int,
) -> dict[str, Any]:
    """Macro-F1 and per-class recall drops (current - candidate) on these items, each with its paired bootstrap
    interval: the same resampled items score both models, so what the two share cancels out."""
    k = len(LABELS)
    index = {label: i for i, label in enumerate(LABELS)}
    truth = np.array([index[t] for t in y_true], dtype=np.int64)
    if truth.size == 0:
        raise ValueError("no eval items to compare the models on")
    codes = np.stack(
        [truth * k + np.array([index[p] for p in predicted], dtype=np.int64) for predicted in (candidate, current)]
    )  # (2, n)
    draws = np.random.default_rng(random_state).integers(0, truth.size, size=(resamples, truth.size))
    point = [_confusions(c[None, :], k)[0] for c in codes]
    resampled = [_confusions(c[draws], k) for c in codes]
    tail = (1 - confidence) / 2 * 100

    def drop(point_drop: float, values: np.ndarray) -> dict[str, float]:
        # A resample without any item of a class says nothing about its recall: left out (nan) of its interval.
        low, high = np.nanpercentile(values, [tail, 100 - tail]) if np.isfinite(values).any() else (0.0, 0.0)
        return {"drop": float(point_drop), "low": float(low), "high": float(high)}

    f1 = [f1_from_confusions(c) for c in point]
    f1_resampled = [f1_from_confusions(c).mean(axis=-1) for c in resampled]
    recall = [_recalls(c) for c in point]
    recall_resampled = [_recalls(c) for c in resampled]
    return {
        "n": int(truth.size),
        "confidence": confidence,
        "resamples": resamples,
        "macro_f1": {
            "candidate": float(f1[0].mean()),
            "current": float(f1[1].mean()),
            **drop(f1[1].mean() - f1[0].mean(), f1_resampled[1] - f1_resampled[0]),
        },
        "per_class_recall": {
            label: {
                "candidate": None if np.isnan(recall[0][i]) else float(recall[0][i]),
                "current": None if np.isnan(recall[1][i]) else float(recall[1][i]),
                **drop(
                    0.0 if np.isnan(recall[0][i]) else recall[1][i] - recall[0][i],
                    recall_resampled[1][:, i] - recall_resampled[0][:, i],
                ),
            }
            for i, label in enumerate(LABELS)
        },
    }


def _describe(name: str, entry: dict[str, Any], allowed: float, confidence: float) -> str:
    return (
        f"{name} {entry['candidate']:.4f} vs current {entry['current']:.4f}: drop {entry['drop']:.4f} "
        f"(allowed {allowed:.4f}), {confidence:.0%} paired bootstrap interval [{entry['low']:.4f}, {entry['high']:.4f}]"
    )


def gate(
    y_true: Sequence[str],
    candidate: Sequence[str],
    current: Sequence[str] | None,
    rules: GateRules,
    *,
    set_name: str = "eval set",
) -> GateDecision:
    """Promote unless macro-F1 or a class's recall drops by more than allowed and beyond noise (the drop's
    interval lies above zero). `candidate`/`current`: each model's predicted label per item of `y_true`."""
    if current is None:
        return GateDecision(True, "no current model to compare with")
    drops = paired_drops(
        y_true,
        candidate,
        current,
        resamples=rules.resamples,
        confidence=rules.confidence,
        random_state=rules.random_state,
    )
    where = f"{set_name} (n={drops['n']})"
    checks = [("macro-F1", drops["macro_f1"], rules.max_f1_drop)] + [
        (f"{label} recall", entry, rules.max_recall_drop)
        for label, entry in drops["per_class_recall"].items()
        if entry["candidate"] is not None
    ]
    noise = []
    for name, entry, allowed in checks:
        if entry["drop"] > allowed and entry["low"] > 0:
            return GateDecision(False, f"{where}: {_describe(name, entry, allowed, rules.confidence)}", drops)
        if entry["drop"] > allowed:
            noise.append(f"{name} drop {entry['drop']:.4f} [{entry['low']:.4f}, {entry['high']:.4f}]")
    macro = drops["macro_f1"]
    reason = (
        f"{where}: macro-F1 {macro['candidate']:.4f} vs current {macro['current']:.4f}, drop {macro['drop']:.4f} "
        f"[{macro['low']:.4f}, {macro['high']:.4f}]; no drop beyond its allowance and noise"
    )
    if noise:
        reason += f" (within noise: {'; '.join(noise)})"
    return GateDecision(True, reason, drops)


def rules_from(settings: Settings) -> GateRules:
    """The gate's rules as configured (the cycle and simulate judge alike)."""
    return GateRules(
        max_f1_drop=settings.gate_max_macro_f1_drop,
        max_recall_drop=settings.gate_max_recall_drop,
        confidence=settings.gate_confidence,
        resamples=settings.gate_resamples,
        random_state=settings.seed,
    )
