"""A tenant's decision on a classified text: allow, review or block, per harmful category and overall.

The one place where a policy (guardloop/core/policy.py) meets a verdict, called by service/classification.py for
every route. Per category: an ignored category is allowed; a score at or above the threshold (the tenant's, else
the model's) blocks; a score in the review band (from its start up to the threshold) asks for review; anything
lower is allowed. Overall: block if any category blocks, else review if any asks for it, else allow. `flagged`
and `flagged_categories` of the verdict are the blocked categories, so /v1/moderations' `flagged` is "block".
The default policy without a file has no band and no overrides: exactly the verdict's own flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from guardloop.models.onnx_model import Verdict
from prometheus_client import Counter

from guardloop.core.guidance import GuidelineLibrary
from guardloop.core.labels import HARMFUL_LABELS
from guardloop.core.policy import ALLOW, BLOCK, OVERALL, REVIEW

DecisionName = Literal["allow", "review", "block"]


@dataclass(frozen=True)
class AppliedPolicy:
    """A tenant policy ready for the request path (built by service/policy_store.py when the file loads)."""

    name: str
    version: str
    thresholds: Mapping[str, float] = field(default_factory=dict)  # the tenant's own; other categories: the model's
    review_from: Mapping[str, float] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    pool: bool = True
    guidelines: GuidelineLibrary | None = None  # None: the service's library
    # (category or OVERALL, decision) -> its counter child, resolved once per load instead of once per text.
    counters: Mapping[tuple[str, str], Counter] = field(default_factory=dict, compare=False, repr=False)

    @property
    def plain(self) -> bool:
        """No overrides, band or ignored category: the verdict's own flags decide (today's rule)."""
        return not (self.thresholds or self.review_from or self.ignored)


@dataclass(frozen=True)
class Decision:
    decision: DecisionName
    categories: dict[str, DecisionName]  # every harmful category
    review_categories: tuple[str, ...] = ()  # those in the review band, nearest their threshold first
    # How far into its band the nearest category is: 0 at the band's start, towards 1 at the threshold.
    closeness: float = 0.0


_NOTHING = Decision(ALLOW, dict.fromkeys(HARMFUL_LABELS, ALLOW))


def decide(verdict: Verdict, model_thresholds: Mapping[str, float], policy: AppliedPolicy) -> tuple[Verdict, Decision]:
    """The verdict as the tenant sees it (flags = blocked categories) and its decision."""
    if policy.plain:
        if not verdict.flagged_categories:
            return verdict, _NOTHING
        blocked = set(verdict.flagged_categories)
        return verdict, Decision(BLOCK, {c: BLOCK if c in blocked else ALLOW for c in HARMFUL_LABELS})
    scores = verdict.scores
    categories: dict[str, DecisionName] = {}
    blocked_list: list[str] = []
    in_band: list[tuple[float, str]] = []
    for category in HARMFUL_LABELS:
        categories[category] = ALLOW
        if category in policy.ignored:
            continue
        score = scores[category]
        threshold = policy.thresholds.get(category, model_thresholds[category])
        if score >= threshold:
            categories[category] = BLOCK
            blocked_list.append(category)
            continue
        start = policy.review_from.get(category)
        if start is not None and score >= start:
            categories[category] = REVIEW
            in_band.append(((score - start) / (threshold - start), category))
    flagged = tuple(sorted(blocked_list, key=lambda c: -scores[c]))
    if flagged != verdict.flagged_categories:
        verdict = dataclasses.replace(verdict, flagged=bool(flagged), flagged_categories=flagged)
    in_band.sort(reverse=True)
    overall: DecisionName = BLOCK if flagged else REVIEW if in_band else ALLOW
    return verdict, Decision(
        overall, categories, tuple(c for _, c in in_band), round(in_band[0][0], 6) if in_band else 0.0
    )


def record_decisions(policy: AppliedPolicy, decisions: list[Decision]) -> None:
    """Count each decision under the tenant (the counters were made from the policy file: bounded labels)."""
    counters = policy.counters
    if not counters:
        return
    for decision in decisions:
        counters[(OVERALL, decision.decision)].inc()
        for category, name in decision.categories.items():
            counters[(category, name)].inc()
