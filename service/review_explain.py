"""Why a pool item is in front of a reviewer, in words, and what the model thought of it.

Two texts, because the page may hide the model's guess until the reviewer has answered (anchoring): `why` never
names a label the model leans to; `model_guess` does. Both are built from one set of probabilities: those of the
model that picked the item (the cycle records them in the request reason), or, for items requested without them,
the ones logged when the text was classified. The one uncertainty shown is the normalized entropy of exactly those
probabilities, so the page never shows two numbers that both claim to be "the uncertainty".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from guardloop.core.labels import LABELS
from guardloop.storage import REVIEW_BAND, StoredItem
from guardloop.storage.rollout_tallies import SHADOW_REASON_KEY

# Top-two probabilities closer than this read as "unsure between"; further apart as "says ..., next is ...".
CLOSE_CALL = 0.2
PICKED = "picked"  # probabilities of the model that picked the item
CLASSIFIED = "classified"  # probabilities logged when the text was classified


@dataclass(frozen=True)
class Explanation:
    why: str  # names no label the model leans to
    model_guess: str  # the model's guess and its runner-up, with probabilities
    predicted: str
    uncertainty: float  # normalized entropy of `scores`: 0 = sure, 1 = no idea
    scores: list[tuple[str, float]]  # all six, highest first
    scored_when: str  # PICKED or CLASSIFIED
    scored_by: str | None  # the model version those probabilities came from, when known


def normalized_entropy(scores: dict[str, float]) -> float:
    total = sum(scores.values()) or 1.0
    probs = [max(p / total, 1e-12) for p in scores.values()]
    return -sum(p * math.log(p) for p in probs) / math.log(len(probs)) if len(probs) > 1 else 0.0


def _recorded_scores(reason: dict[str, Any]) -> dict[str, float] | None:
    scores = reason.get("scores")
    if not isinstance(scores, dict) or set(scores) != set(LABELS):
        return None
    if not all(isinstance(p, int | float) and math.isfinite(p) and p >= 0 for p in scores.values()):
        return None
    return {label: float(scores[label]) for label in LABELS}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _strategy_words(reason: dict[str, Any]) -> str:
    strategy = str(reason.get("strategy") or "")
    if SHADOW_REASON_KEY in reason:
        return (
            "The model serving now and a candidate model tried beside it disagree about it: your label shows which "
            "of the two is right, and decides whether the candidate goes on."
        )
    if strategy == REVIEW_BAND:
        return (
            "It scored close to a chatbot's limit for one of its categories: borderline messages are reviewed "
            "first, and their labels tune that chatbot's limits."
        )
    size = _number(reason.get("cluster_size"))
    group = f"a group of {int(size)} similar unlabeled messages" if size else "a group of similar unlabeled messages"
    if strategy == "cluster":
        return f"It stands for {group}: of that group, the model is least sure about this one."
    if strategy == "rare-cluster":
        if reason.get("slot") == "quota":
            return (
                f"It stands for {group}, and it may belong to a label the model has few labeled examples of "
                f"({int(_number(reason.get('labeled_count')) or 0)} so far)."
            )
        return f"It stands for {group}, and the model is unsure about it."
    if strategy == "topn":
        return "It is among the messages the model is least sure about."
    if strategy == "random":
        return "It is a random sample, to check the model on everyday messages."
    if strategy == "coreset":
        return "It is unlike anything labeled so far, so its label teaches the model something new."
    if strategy == "small-text-breaking-ties":
        return "The model's two most likely labels for it are nearly tied."
    if strategy == "small-text-kmeans":
        return "It is the most typical message of a group of similar messages."
    if strategy:
        return f"The trainer asked for it ({strategy})."
    return "The trainer asked for it."


def _guess_words(ranked: list[tuple[str, float]], reason: dict[str, Any]) -> str:
    (first, p1), (second, p2) = ranked[0], ranked[1]
    if p1 - p2 < CLOSE_CALL:
        words = f"The model is unsure between {first} ({p1:.2f}) and {second} ({p2:.2f})."
    else:
        words = f"The model says {first} ({p1:.2f}); next is {second} ({p2:.2f})."
    shadow_label = reason.get("shadow_label")
    if SHADOW_REASON_KEY in reason and isinstance(shadow_label, str) and shadow_label in LABELS:
        words += f" The candidate model says {shadow_label}."
    quota = reason.get("quota_class")
    p_class = _number(reason.get("p_class"))
    if reason.get("slot") == "quota" and isinstance(quota, str) and quota in LABELS and p_class is not None:
        words += f" It was picked as a possible {quota} ({p_class:.2f})."
    return words


def explain(item: StoredItem) -> Explanation:
    reason = item.request_reason if isinstance(item.request_reason, dict) else {}
    recorded = _recorded_scores(reason)
    if recorded is not None:
        scores, when = recorded, PICKED
        by = reason.get("scored_by") if isinstance(reason.get("scored_by"), str) else None
    else:
        scores, when = {label: float(item.scores.get(label, 0.0)) for label in LABELS}, CLASSIFIED
        by = item.model_version
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], LABELS.index(kv[0])))
    uncertainty = normalized_entropy(scores)

    if item.suspected_at is not None:
        # Checked first: a doubted label's item keeps its original request reason, which no longer says why.
        why = (
            "Another reviewer has labeled it, and the check of all labels before training doubts that label: "
            "yours is the second look that settles it."
        )
    elif item.requested_at is None or not reason:
        why = "It was sampled from the pool of messages the model was unsure about."
    else:
        why = _strategy_words(reason)
    if item.seen_count > 1:
        why += f" The same message came in {item.seen_count} times."
    return Explanation(
        why=why,
        model_guess=_guess_words(ranked, reason),
        predicted=ranked[0][0],
        uncertainty=round(uncertainty, 3),
        scores=[(label, round(p, 4)) for label, p in ranked],
        scored_when=when,
        scored_by=by,
    )
