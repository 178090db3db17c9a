"""Judging a roll-out from its tallies: when a shadow may go on to canary, when a canary must be stopped.

Pure functions over the counts the replicas keep (plain nested dicts of numbers, summed over replicas), so the
service (which halts a bad canary) and the trainer (which promotes a shadow and raises canary steps) judge alike.

Shadow counts:  scored, dropped, disagreed (texts whose label differs), shadow_seconds,
                per_class[label]: disagreed (one model gives the label, the other does not), serving_flagged,
                shadow_flagged
Canary counts:  canary / stable: requests, errors, texts, flagged, seconds (request time in the model)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from guardloop.core.labels import LABELS


def add_counts(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """Add `more` into `total` key by key, nested dicts recursively; returns `total`."""
    for key, value in more.items():
        if isinstance(value, Mapping):
            add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int | float):
            total[key] = total.get(key, 0) + value
    return total


def empty_shadow_counts() -> dict[str, Any]:
    per_class = {label: {"disagreed": 0, "serving_flagged": 0, "shadow_flagged": 0} for label in LABELS}
    return {"scored": 0, "dropped": 0, "disagreed": 0, "shadow_seconds": 0.0, "per_class": per_class}


def empty_canary_counts() -> dict[str, Any]:
    side = {"requests": 0, "errors": 0, "texts": 0, "flagged": 0, "seconds": 0.0}
    return {"canary": dict(side), "stable": dict(side)}


def shadow_summary(counts: Mapping[str, Any]) -> dict[str, Any]:
    """Rates for people (CLI, /models/current, the cycle record): disagreement overall and per class, and each
    class's flag-rate change (shadow minus serving)."""
    scored = int(counts.get("scored", 0))
    per_class = counts.get("per_class", {})

    def rate(value: float) -> float | None:
        return round(value / scored, 4) if scored else None

    def tally(label: str, key: str) -> int:
        return int(per_class.get(label, {}).get(key, 0))

    return {
        "scored": scored,
        "dropped": int(counts.get("dropped", 0)),
        "disagreement": rate(counts.get("disagreed", 0)),
        "mean_shadow_ms": round(1000 * counts.get("shadow_seconds", 0.0) / scored, 3) if scored else None,
        "per_class": {
            label: {
                "disagreement": rate(tally(label, "disagreed")),
                "flag_rate_change": rate(tally(label, "shadow_flagged") - tally(label, "serving_flagged")),
            }
            for label in LABELS
        },
    }


@dataclass(frozen=True)
class ShadowDecision:
    action: Literal["wait", "promote", "reject"]
    reason: str


def judge_shadow(
    counts: Mapping[str, Any],
    *,
    min_texts: int,
    max_disagreement: float,
    reviewed_for_candidate: int = 0,
    reviewed_for_serving: int = 0,
    min_reviewed: int = 10,
) -> ShadowDecision:
    """Promote after `min_texts` shadow-scored texts when the disagreement, overall and on every class, is within
    `max_disagreement`; otherwise only when reviewers settled at least `min_reviewed` disagreements and more of
    them in the candidate's favour than in the serving model's (fewer: it stays in shadow; against it: rejected)."""
    summary = shadow_summary(counts)
    if summary["scored"] < min_texts:
        return ShadowDecision("wait", f"{summary['scored']} of {min_texts} shadow texts scored")
    worst = max(LABELS, key=lambda label: summary["per_class"][label]["disagreement"] or 0.0)
    worst_rate = summary["per_class"][worst]["disagreement"] or 0.0
    overall = summary["disagreement"] or 0.0
    if overall <= max_disagreement and worst_rate <= max_disagreement:
        return ShadowDecision(
            "promote",
            f"agreement within bounds on {summary['scored']} texts: disagreement {overall:.4f}, "
            f"worst class {worst} {worst_rate:.4f} <= {max_disagreement:.4f}",
        )
    out_of_bounds = f"disagreement {overall:.4f}, {worst} {worst_rate:.4f} > {max_disagreement:.4f}"
    settled = reviewed_for_candidate + reviewed_for_serving
    if settled < min_reviewed:
        return ShadowDecision(
            "wait", f"{out_of_bounds}; {settled} of {min_reviewed} disagreements settled by reviewers so far"
        )
    if reviewed_for_candidate > reviewed_for_serving:
        return ShadowDecision(
            "promote",
            f"{out_of_bounds}, but reviewers settled {reviewed_for_candidate} of {settled} disagreements "
            "in the candidate's favour",
        )
    return ShadowDecision(
        "reject", f"{out_of_bounds}; reviewers sided with the serving model in {reviewed_for_serving} of {settled}"
    )


@dataclass(frozen=True)
class CanaryBounds:
    min_requests: int  # canary requests (summed over replicas) before a step is judged or raised
    max_flag_rate_increase: float  # canary flag rate minus the stable model's, per text
    max_error_rate: float  # canary errors per request above the stable model's
    max_latency_ratio: float  # canary mean time per request over the stable model's


def canary_problem(counts: Mapping[str, Any], bounds: CanaryBounds) -> str | None:
    """Why the canary must be rolled back, or None while it stays within bounds (or is too young to judge).

    Errors are judged from the first request (a failing canary must not wait for a sample); flag rate and latency
    once `min_requests` canary requests are in, against the stable model over the same period."""
    canary, stable = counts.get("canary", {}), counts.get("stable", {})
    requests = canary.get("requests", 0)
    if not requests:
        return None
    error_rate = canary.get("errors", 0) / requests
    stable_error_rate = stable.get("errors", 0) / stable["requests"] if stable.get("requests") else 0.0
    if error_rate - stable_error_rate > bounds.max_error_rate and canary.get("errors", 0) >= 3:
        return f"canary error rate {error_rate:.3f} vs stable {stable_error_rate:.3f} (bound +{bounds.max_error_rate})"
    if requests < bounds.min_requests or not stable.get("texts") or not canary.get("texts"):
        return None
    flag_rate = canary.get("flagged", 0) / canary["texts"]
    stable_flag_rate = stable.get("flagged", 0) / stable["texts"]
    if flag_rate - stable_flag_rate > bounds.max_flag_rate_increase:
        return (
            f"canary flag rate {flag_rate:.3f} vs stable {stable_flag_rate:.3f} "
            f"(bound +{bounds.max_flag_rate_increase}) over {requests} canary requests"
        )
    latency = canary.get("seconds", 0.0) / requests
    stable_latency = stable.get("seconds", 0.0) / stable["requests"] if stable.get("requests") else 0.0
    if stable_latency > 0 and latency > bounds.max_latency_ratio * stable_latency:
        return (
            f"canary mean {1000 * latency:.1f} ms per request vs stable {1000 * stable_latency:.1f} ms "
            f"(bound x{bounds.max_latency_ratio})"
        )
    return None
