"""What a simulation measures, and its report: per-iteration records, the `--results` JSON-lines file that
keeps them as they finish, the mean over seeds, and the table `simulate` and `simulate-report` print.

Kept apart from `simulate.py` (and free of torch) so that reading and summarizing results needs no training stack.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guardloop.core.labels import LABELS


def class_count_std(counts: dict[str, int]) -> float:
    """Population standard deviation of per-class counts over all six labels (the paper's balance measure)."""
    return float(np.std([counts.get(label, 0) for label in LABELS]))


@dataclass
class IterationResult:
    iteration: int
    acquired: dict[str, int]  # human (oracle) labels acquired so far, by class
    acquired_with_variations: dict[str, int]  # plus accepted variations, by class
    std_labels: float
    std_with_variations: float
    variations_accepted: int
    train_size: int
    eval_macro_f1: float
    eval_per_class_f1: dict[str, float]
    seconds: float
    promoted: bool = True  # whether the gate let this iteration's model replace the one that scored its pool
    variations_verified: int = 0  # this iteration's rewrites that reached the verifier
    variations_rejected: int = 0  # of those, rejected by it
    variations_composed: int = 0  # accepted new posts composed from several labeled texts of a class
    labels_suspected: int = 0  # new labels the label check withheld for a second look (the oracle's, next iteration)

    @property
    def rejected_share(self) -> float | None:
        """Share of this iteration's rewrites the verifier rejected; None when it judged none."""
        return self.variations_rejected / self.variations_verified if self.variations_verified else None


@dataclass
class SimulationResult:
    strategy: str
    seed: int
    baseline_macro_f1: float
    iterations: list[IterationResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "baseline_macro_f1": self.baseline_macro_f1,
            "iterations": [it.__dict__ for it in self.iterations],
        }


def append_result_line(path: Path, strategy: str, seed: int, baseline: float, iteration: IterationResult) -> None:
    """One JSON line per finished iteration, flushed at once: a run stopped part-way keeps what it measured."""
    line = {"strategy": strategy, "seed": seed, "baseline_macro_f1": baseline, **iteration.__dict__}
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


RESULT_KEYS = ("strategy", "seed", "iteration", "baseline_macro_f1", "eval_macro_f1", "std_labels", "acquired")


def read_result_lines(path: Path) -> list[dict[str, Any]]:
    """Lines written by `append_result_line`; ValueError naming the line when one is not."""
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        line = json.loads(text)
        missing = [key for key in RESULT_KEYS if not isinstance(line, dict) or key not in line]
        if missing:
            raise ValueError(f"line {number} has no {missing[0]!r}")
        lines.append(line)
    return lines


CRITICAL = "emergency-situation"  # the rare critical class the tables name


def _mean_per_class(at: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean over seeds of a per-class field; lines written before the field existed count as absent (NaN)."""
    return {
        label: float(np.mean([x[key][label] for x in at])) if all(key in x for x in at) else float("nan")
        for label in LABELS
    }


def summarize(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and iteration: mean and spread over seeds of label std, std with variations, eval macro-F1,
    per-class counts (labels, and with variations) and per-class eval F1, and the share of rewrites the
    verifier rejected (over all seeds' rewrites of that iteration).

    Only the iterations every seed of that strategy reached are averaged, so a stopped run never mixes depths.
    """
    by_run: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for line in lines:
        by_run.setdefault((line["strategy"], line["seed"]), {})[line["iteration"]] = line
    rows = []
    for strategy in dict.fromkeys(name for name, _ in by_run):
        runs = [iters for (name, _), iters in by_run.items() if name == strategy]
        for iteration in sorted(set.intersection(*(set(r) for r in runs))):
            at = [r[iteration] for r in runs]
            f1 = np.array([x["eval_macro_f1"] for x in at])
            rows.append(
                {
                    "strategy": strategy,
                    "iteration": iteration,
                    "seeds": sorted(x["seed"] for x in at),
                    "std_labels": float(np.mean([x["std_labels"] for x in at])),
                    "std_with_variations": float(np.mean([x["std_with_variations"] for x in at])),
                    "baseline_macro_f1": float(np.mean([x["baseline_macro_f1"] for x in at])),
                    "eval_macro_f1": float(f1.mean()),
                    "eval_macro_f1_sd": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
                    "acquired": {label: float(np.mean([x["acquired"][label] for x in at])) for label in LABELS},
                    "acquired_with_variations": _mean_per_class(at, "acquired_with_variations"),
                    "eval_per_class_f1": _mean_per_class(at, "eval_per_class_f1"),
                    "rejected_share": _share(
                        sum(x.get("variations_rejected", 0) for x in at),
                        sum(x.get("variations_verified", 0) for x in at),
                    ),
                    # this iteration's accepted posts composed from several labeled texts, mean over seeds
                    "composed": (
                        float(np.mean([x["variations_composed"] for x in at]))
                        if all("variations_composed" in x for x in at)
                        else None
                    ),
                }
            )
    return rows


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _number(value: float | None, width: int, scale: float = 1.0) -> str:
    """One right-aligned cell; '-' where there is no data (None, or NaN from results written before the field)."""
    return f"{'-':>{width}}" if value is None or np.isnan(value) else f"{scale * value:>{width}.1f}"


def _percent(value: float | None, width: int) -> str:
    return _number(value, width, 100.0)


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The lines of the tables `simulate` and `simulate-report` print, one row per strategy and iteration: the
    acquired labels per class with their std, std with variations, macro-F1, emergency-situation F1, the share
    of rewrites the verifier rejected and the iteration's composed posts; then, per class, the counts with
    variations and the eval F1."""
    labels = " ".join(f"{label[:5]:>6}" for label in LABELS)
    head = f"{'strategy':<13}{'it':>3}{'seeds':>6}  "
    lines = [
        f"{head}{labels}{'std':>7}{'std+var':>8}{'base F1':>9}{'F1':>8}{'±':>6}{'emerg F1':>9}{'rejected%':>10}"
        f"{'composed':>9}"
    ]
    for row in rows:
        counts = " ".join(f"{row['acquired'][label]:>6.1f}" for label in LABELS)
        critical = row.get("eval_per_class_f1", {}).get(CRITICAL)
        lines.append(
            f"{row['strategy']:<13}{row['iteration']:>3}{len(row['seeds']):>6}  {counts}{row['std_labels']:>7.1f}"
            f"{row['std_with_variations']:>8.1f}{100 * row['baseline_macro_f1']:>9.1f}"
            f"{100 * row['eval_macro_f1']:>8.1f}{100 * row['eval_macro_f1_sd']:>6.1f}"
            f"{_percent(critical, 9)}{_percent(row.get('rejected_share'), 10)}{_number(row.get('composed'), 9)}"
        )
    groups = f"{' ' * len(head)}{'labels + variations per class':<41}  eval F1 per class (%)"
    lines += ["", groups, f"{head}{labels}  {labels}"]
    for row in rows:
        with_variations = row.get("acquired_with_variations", {})
        counts = " ".join(_number(with_variations.get(label), 6) for label in LABELS)
        f1 = " ".join(_percent(row.get("eval_per_class_f1", {}).get(label), 6) for label in LABELS)
        lines.append(f"{row['strategy']:<13}{row['iteration']:>3}{len(row['seeds']):>6}  {counts}  {f1}")
    return lines


def iteration_line(strategy: str, seed: int, it: IterationResult) -> str:
    """The progress line `simulate` prints when an iteration finishes."""
    return (
        f"{strategy:<8} seed {seed:<4} it {it.iteration}: labels "
        + " ".join(f"{n}" for n in it.acquired.values())
        + f" (std {it.std_labels:.1f}; with variations std {it.std_with_variations:.1f}, "
        f"{it.variations_accepted} new variations ({it.variations_composed} composed), verifier rejected "
        f"{it.variations_rejected} of "
        f"{it.variations_verified})  eval macro-F1 {it.eval_macro_f1:.4f}  "
        f"{CRITICAL} F1 {it.eval_per_class_f1.get(CRITICAL, float('nan')):.4f}  {it.seconds:.0f}s"
    )
