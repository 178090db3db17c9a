"""How far reviewers agree, from their live labels: Krippendorff's alpha (nominal) over all items, one-vs-rest
alpha per class, and per reviewer pair alpha and Cohen's kappa on the items both labelled. Labels are only as
good as this number; it is measured on every item that has two or more live labels (with one label required,
review_second_opinion_share sends a share of items to a second reviewer so that there always are some)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import krippendorff
import numpy as np
from sqlalchemy import select

from guardloop.core.labels import LABELS
from guardloop.storage.db import Database
from guardloop.storage.review import live_review_label
from guardloop.storage.tables import Label, PoolItem

# item id -> reviewer -> label: one live label per reviewer and item (the live-answer index guarantees it)
LabelsByItem = Mapping[int, Mapping[str, str]]


@dataclass(frozen=True)
class PairAgreement:
    """Two reviewers on the items both labelled; None where undefined (under 2 shared items, or no variation)."""

    reviewers: tuple[str, str]
    items: int
    alpha: float | None
    cohen_kappa: float | None


@dataclass(frozen=True)
class Agreement:
    """Agreement over the items with at least two live labels (`items` of them, holding `labels` labels)."""

    items: int
    labels: int
    alpha: float | None
    by_class: dict[str, float | None]
    pairs: list[PairAgreement]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pairs"] = [{**pair, "reviewers": list(pair["reviewers"])} for pair in data["pairs"]]
        return data


def nominal_alpha(units: list[list[str]]) -> float | None:
    """Krippendorff's alpha (nominal) of units, each the labels its coders gave (2+ each; the `krippendorff`
    package does the arithmetic). None when undefined: fewer than two units, or a single value throughout
    (expected disagreement is zero)."""
    if len(units) < 2 or len({value for unit in units for value in unit}) < 2:
        return None
    codes = {value: index for index, value in enumerate(sorted({value for unit in units for value in unit}))}
    # value_counts form: one row per unit, one column per value, how many coders gave it; no coder identities needed.
    counts = np.zeros((len(units), len(codes)), dtype=int)
    for row, unit in enumerate(units):
        for value in unit:
            counts[row, codes[value]] += 1
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e), p_e from each rater's own
    marginals. Written out (four lines) instead of scikit-learn's cohen_kappa_score because the service does not
    install scikit-learn (it is in the train extra); tests check it against a hand-computed value.
    None when undefined: fewer than two items, or p_e = 1 (both always gave the same single label)."""
    n = len(first)
    if n < 2:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    first_counts, second_counts = Counter(first), Counter(second)
    expected = sum(first_counts[value] * second_counts[value] for value in first_counts) / (n * n)
    if math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1 - expected)


def compute_agreement(labels: LabelsByItem) -> Agreement:
    """Agreement of the given live labels; items with fewer than two labels do not count."""
    shared = {item: dict(by_reviewer) for item, by_reviewer in labels.items() if len(by_reviewer) >= 2}
    units = [list(by_reviewer.values()) for by_reviewer in shared.values()]
    by_class = {label: nominal_alpha([[str(value == label) for value in unit] for unit in units]) for label in LABELS}
    reviewers = sorted({reviewer for by_reviewer in shared.values() for reviewer in by_reviewer})
    pairs = []
    for first, second in combinations(reviewers, 2):
        both = [(r[first], r[second]) for r in shared.values() if first in r and second in r]
        if not both:
            continue
        pairs.append(
            PairAgreement(
                reviewers=(first, second),
                items=len(both),
                alpha=nominal_alpha([[a, b] for a, b in both]),
                cohen_kappa=cohen_kappa([a for a, _ in both], [b for _, b in both]),
            )
        )
    return Agreement(
        items=len(shared),
        labels=sum(len(unit) for unit in units),
        alpha=nominal_alpha(units),
        by_class=by_class,
        pairs=pairs,
    )


def read_agreement(database: Database) -> Agreement:
    """Agreement of the live review labels (skips, "unsure" and adjudications left out) of requested items."""
    with database.read() as session:
        rows = session.execute(
            select(Label.item_id, Label.reviewer, Label.label)
            .join(PoolItem, Label.item_id == PoolItem.id)
            .where(live_review_label(), PoolItem.requested_at.is_not(None))
        ).all()
    labels: dict[int, dict[str, str]] = {}
    for item_id, reviewer, label in rows:
        labels.setdefault(item_id, {})[reviewer] = label
    return compute_agreement(labels)
