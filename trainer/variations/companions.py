"""What an item short of its variation budget composes new posts from: a few other labeled texts of its class.

A rare class's few items get mostly rejected rewrites (a small LLM drifts from one short post), so the budget the
class-deficit split gave them would go unspent; a post written from several texts of the class is a new example
of it rather than a paraphrase of one (the optional part of Hassan et al.'s generation for rare classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def companions_for(
    items: Sequence[tuple[str, str]], labeled: Sequence[tuple[str, str]], n: int, *, random_state: int
) -> list[list[str]]:
    """Per item, up to `n` other texts of its class drawn (without replacement) from `labeled`, the (text, label)
    pairs a composed post may learn from: human labels and base data, never variations (a rewrite of a rewrite
    drifts further) and never the gold reserve (it would leak into training)."""
    by_class: dict[str, list[str]] = {}
    for text, label in labeled:
        by_class.setdefault(label, []).append(text)
    rng = np.random.default_rng(random_state)
    chosen = []
    for text, label in items:
        others = [other for other in dict.fromkeys(by_class.get(label, [])) if other != text]
        picks = rng.choice(len(others), size=min(n, len(others)), replace=False) if others and n > 0 else []
        chosen.append([others[int(i)] for i in picks])
    return chosen
