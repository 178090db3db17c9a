"""Generation by class deficit: the variation budget goes to the classes the training set has fewest of."""

from __future__ import annotations

from collections import Counter

import pytest
from guardloop.trainer import steps
from guardloop.trainer.variations.budget import variation_budget

from guardloop.core.labels import LABELS

SKEWED = {  # a training set shaped like the traffic: not-harmful dominates, emergencies are rare
    "not-harmful": 300,
    "medical-advice": 150,
    "self-harm": 100,
    "legal-advice": 80,
    "financial-advice": 70,
    "emergency-situation": 20,
}


def per_class(labels: list[str], budgets: list[int]) -> Counter[str]:
    total: Counter[str] = Counter()
    for label, budget in zip(labels, budgets, strict=True):
        total[label] += budget
    return total


def test_the_dominant_class_gets_none_and_the_rare_ones_get_k_each():
    labels = ["not-harmful"] * 10 + ["emergency-situation"] * 2 + ["self-harm"] * 2 + ["legal-advice"] * 6
    budgets = variation_budget(labels, SKEWED, k=5)
    got = per_class(labels, budgets)
    assert got["not-harmful"] == 0
    assert got["emergency-situation"] == 10 and got["self-harm"] == 10 and got["legal-advice"] == 30
    assert all(0 <= b <= 5 for b in budgets)
    # The uniform (paper) budget would have given not-harmful half of all variations.
    assert sum(budgets) == 50 < 5 * len(labels)


def test_a_tight_budget_raises_the_thinnest_class_first():
    labels = ["emergency-situation", "legal-advice", "medical-advice"]
    counts = {"emergency-situation": 10, "legal-advice": 12, "medical-advice": 40, "not-harmful": 41}
    budgets = variation_budget(labels, counts, k=5)
    # 15 to spend: emergency 10 -> 15 (+5, its cap), legal 12 -> 17 (+5), medical 40 -> 41 (+1): the largest
    # class (41) is the ceiling, so medical gets only its gap and 4 units are left unspent.
    assert budgets == [5, 5, 1]


def test_water_filling_equalizes_when_the_cap_is_not_reached():
    labels = ["emergency-situation"] * 4 + ["self-harm"] * 4
    counts = {"emergency-situation": 50, "self-harm": 54, "not-harmful": 100}
    budgets = variation_budget(labels, counts, k=5)
    got = per_class(labels, budgets)
    # 40 units; the level both classes reach differs by at most one.
    assert got["emergency-situation"] == 20 and got["self-harm"] == 20
    budgets = variation_budget(labels, counts, k=2)  # 16 units: the thinner class is lifted to the other first
    got = per_class(labels, budgets)
    assert got["emergency-situation"] == 8 and got["self-harm"] == 8
    labels = ["emergency-situation"] * 4 + ["self-harm"] * 1
    budgets = variation_budget(labels, {"emergency-situation": 50, "self-harm": 60, "not-harmful": 100}, k=5)
    assert per_class(labels, budgets) == {"emergency-situation": 20, "self-harm": 5}


def test_a_balanced_training_set_asks_for_little_and_an_item_never_gets_more_than_k():
    labels = list(LABELS) * 2
    assert variation_budget(labels, dict.fromkeys(LABELS, 86), k=5) == [0] * 12
    budgets = variation_budget(labels, {**dict.fromkeys(LABELS, 86), "not-harmful": 91}, k=5)
    got = per_class(labels, budgets)
    assert got["not-harmful"] == 0 and all(got[label] == 5 for label in LABELS if label != "not-harmful")
    assert max(budgets) <= 3  # a class's 5 are spread over its two items


def test_edge_cases():
    assert variation_budget([], SKEWED, k=5) == []
    assert variation_budget(["self-harm"], SKEWED, k=0) == [0]
    assert variation_budget(["self-harm"], {}, k=3) == [0]  # nothing to balance against: every class is 0
    with pytest.raises(ValueError, match="k must be"):
        variation_budget(["self-harm"], SKEWED, k=-1)


def test_generate_skips_zero_budget_items_and_cuts_each_to_its_budget():
    asked: list[list[tuple[str, str]]] = []
    wanted: list[list[int] | None] = []

    def make(items, proba, wants, companions):
        asked.append(list(items))
        wanted.append(None if wants is None else list(wants))
        return steps.Generated([[f"{text} v{n}" for n in range(5)] for text, _ in items], 2, 0, 10, 3)

    items = [("a", "not-harmful"), ("b", "emergency-situation"), ("c", "self-harm")]
    generated = steps.generate(make, items, None, [0, 5, 2])
    assert asked == [[("b", "emergency-situation"), ("c", "self-harm")]]  # the zero-budget item is never sent
    assert wanted == [[5, 2]]  # each sent item is asked for its budget
    assert generated.accepted == [[], [f"b v{n}" for n in range(5)], ["c v0", "c v1"]]
    assert (generated.filtered, generated.verified, generated.rejected) == (2, 10, 3)
    assert steps.generate(make, items, None, [0, 0, 0]).accepted == [[], [], []] and len(asked) == 1
    assert len(steps.generate(make, items, None, None).accepted) == 3 and wanted[-1] is None  # no budget: k each
    # "uniform" is the paper's: no budgets, every item asked for k.
    assert steps.variation_budgets("uniform", items, ["not-harmful"] * 5, 5) is None
    assert steps.variation_budgets("deficit", items, ["not-harmful"] * 5 + ["self-harm"], 5) == [0, 5, 4]
