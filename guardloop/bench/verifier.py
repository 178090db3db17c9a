"""How label-true accepted variations are, before and after the verifier, on a hand-labeled sample.

The sample (e.g. docs/variations-hand-labeled.jsonl) holds variations that hygiene accepted, one JSON object a
line: `source` (the labeled text), `label` (its label), `variation`, and `hand_label` (the class a person gave the
variation alone), and for a composed post (a new post written from several labeled texts of the class) also
`companions`, the other texts it was written from. Off-label: hand_label != label. The verifier runs on each
source's variations together, as in a cycle, and the counts say how many were kept, how many of those are
off-label, what was rejected and why, and how many label-true variations it cost.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardloop.core.labels import LABELS, parse_label
from guardloop.trainer.variations.verifier import Verifier

FIELDS = ("source", "label", "variation", "hand_label")


@dataclass(frozen=True)
class Judged:
    source: str
    label: str
    variation: str
    hand_label: str
    kept: bool
    reason: str | None  # why it was rejected

    @property
    def off_label(self) -> bool:
        return self.hand_label != self.label


def load_sample(path: Path) -> list[dict[str, Any]]:
    """The sample's rows; ValueError naming the line that is not one."""
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            missing = [key for key in FIELDS if not isinstance(row.get(key), str)]
            if missing:
                raise ValueError(f"no {missing[0]!r}")
            row["label"], row["hand_label"] = parse_label(row["label"]), parse_label(row["hand_label"])
            companions = row.setdefault("companions", [])
            if not isinstance(companions, list) or not all(isinstance(text, str) for text in companions):
                raise ValueError("'companions' must be a list of texts")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
        rows.append(row)
    return rows


def judge_sample(rows: Sequence[dict[str, Any]], verifier: Verifier) -> list[Judged]:
    """Every row with the verifier's decision; each source's variations are verified together, as in a cycle."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["source"], row["label"], tuple(row.get("companions", ()))), []).append(row)
    judged = {}
    for (source, label, companions), members in groups.items():
        reasons = verifier.decide(source, label, [row["variation"] for row in members], companions)
        for row, reason in zip(members, reasons, strict=True):
            judged[id(row)] = Judged(source, label, row["variation"], row["hand_label"], reason is None, reason)
    return [judged[id(row)] for row in rows]


def summarize(judged: Sequence[Judged]) -> dict[str, Any]:
    kept = [j for j in judged if j.kept]
    rejected = [j for j in judged if not j.kept]

    def rate(part: int, whole: int) -> float | None:
        return round(part / whole, 4) if whole else None

    return {
        "before": {"n": len(judged), "off_label": sum(j.off_label for j in judged)},
        "after": {"n": len(kept), "off_label": sum(j.off_label for j in kept)},
        "off_label_rate_before": rate(sum(j.off_label for j in judged), len(judged)),
        "off_label_rate_after": rate(sum(j.off_label for j in kept), len(kept)),
        "rejected_by_reason": dict(Counter(j.reason or "" for j in rejected)),
        "rejected_off_label": sum(j.off_label for j in rejected),
        "rejected_label_true": sum(not j.off_label for j in rejected),
        "per_class": {
            label: {
                "before": sum(j.label == label for j in judged),
                "off_before": sum(j.label == label and j.off_label for j in judged),
                "after": sum(j.label == label for j in kept),
                "off_after": sum(j.label == label and j.off_label for j in kept),
            }
            for label in LABELS
        },
    }


def report_lines(summary: dict[str, Any]) -> list[str]:
    before, after = summary["before"], summary["after"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"before the verifier: {before['n']} accepted, {before['off_label']} off-label "
        f"({pct(summary['off_label_rate_before'])})",
        f"after the verifier:  {after['n']} accepted, {after['off_label']} off-label "
        f"({pct(summary['off_label_rate_after'])})",
        f"rejected: {summary['rejected_off_label']} off-label, {summary['rejected_label_true']} label-true; by reason "
        + ", ".join(f"{why} {n}" for why, n in sorted(summary["rejected_by_reason"].items())),
        f"{'class':<20}{'before':>8}{'off':>6}{'after':>8}{'off':>6}",
    ]
    for label, counts in summary["per_class"].items():
        lines.append(
            f"{label:<20}{counts['before']:>8}{counts['off_before']:>6}{counts['after']:>8}{counts['off_after']:>6}"
        )
    return lines
