"""How many variations each newly labeled item gets: the budget goes where the training set is thin.

The paper asks for k variations of every labeled item, so variations copy the skew of what was labeled (the
dominant not-harmful class gets the most). Here the same total, k per item, is poured into the classes by
water-filling: the thinnest class of the training set is raised first, then the next, until the budget is spent,
every class below the level has had k per item of its new items, or the level reaches the largest class. The
largest class (usually not-harmful) therefore gets none, and budget that no thinner class can use is not spent,
which also saves LLM time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from guardloop.core.labels import LABELS


def variation_budget(new_labels: Sequence[str], train_counts: Mapping[str, int], k: int) -> list[int]:
    """Variations to ask for, per new item (same order as `new_labels`), each in 0..k.

    `train_counts`: examples per class in the training set the variations will join (base data, labels and
    variations so far, the new items included or not: only the differences between classes matter).
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    if not new_labels or k == 0:
        return [0] * len(new_labels)
    new = Counter(new_labels)
    classes = [label for label in LABELS if new[label]] + sorted(set(new) - set(LABELS))
    counts = np.array([float(train_counts.get(label, 0)) for label in classes])
    caps = np.array([float(k * new[label]) for label in classes])
    total = float(k * len(new_labels))
    ceiling = float(max([*train_counts.values(), *counts]))  # never raise a class above the largest one
    per_class = _water_fill(counts, caps, total, ceiling)
    budgets = [0] * len(new_labels)
    for label, amount in zip(classes, per_class, strict=True):
        positions = [i for i, y in enumerate(new_labels) if y == label]
        # Spread the class's share over its items: the first ones get one more when it does not divide evenly.
        base, extra = divmod(int(amount), len(positions))
        for rank, i in enumerate(positions):
            budgets[i] = min(k, base + (1 if rank < extra else 0))
    return budgets


def _water_fill(counts: np.ndarray, caps: np.ndarray, total: float, ceiling: float) -> np.ndarray:
    """Integer amounts a_c in 0..cap_c with sum <= total that raise min(counts + a) as far as possible, never
    past `ceiling`.

    Level L: the largest up to `ceiling` with sum(min(cap, max(0, L - count))) <= total (bisection), rounded down
    per class; the units that rounding left over go one at a time to the class that is then lowest and not capped.
    """

    def spent(level: float) -> float:
        return float(np.minimum(caps, np.maximum(0.0, level - counts)).sum())

    low, high = float(counts.min()), max(float(counts.min()), ceiling)
    if spent(high) <= total:
        low = high
    for _ in range(100 if low < high else 0):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) <= total else (low, mid)
    amounts = np.floor(np.minimum(caps, np.maximum(0.0, low - counts)) + 1e-9)
    left = round(total - amounts.sum())
    for _ in range(left):
        room = (amounts < caps) & (counts + amounts < min(low + 1, ceiling))  # only classes below the level
        if not room.any():
            break
        candidates = np.flatnonzero(room)
        amounts[candidates[np.argmin((counts + amounts)[candidates])]] += 1
    return amounts
