"""Suspected mislabels, found before each training by confident learning (cleanlab).

A logistic regression on the sentence embeddings the cycle already computes gives every label an out-of-fold
probability: each text is scored by a model that never saw it (cross_val_predict, stratified folds, a fixed
random_state). cleanlab's find_label_issues compares those probabilities with the given labels, class by class
(per-class confidence thresholds, so a rare class is not flagged merely for being rare), and names the labels
that look wrong. The base training data takes part in the folds (more data, steadier thresholds) but only
reviewed labels that a single person settled can be flagged: the base set is curated, and a label two people
already looked at has had its second look.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_PER_CLASS = 2  # a class needs this many examples for stratified folds to put one on each side


@dataclass(frozen=True)
class Suspect:
    index: int  # into the reviewed labels given to find_suspects
    given: str
    suggested: str
    quality: float  # out-of-fold probability of the given label (cleanlab's self-confidence)


@dataclass(frozen=True)
class CheckResult:
    suspects: list[Suspect]
    checked: int  # reviewed labels that could be flagged
    flagged_before_cap: int  # what cleanlab named before max_share cut the list
    skipped: str | None = None  # why no check ran (too little data)


def find_suspects(
    base_embeddings: np.ndarray,
    base_labels: Sequence[str],
    embeddings: np.ndarray,
    labels: Sequence[str],
    eligible: Sequence[bool],
    *,
    random_state: int,
    folds: int = 5,
    max_share: float = 0.2,
) -> CheckResult:
    """The reviewed labels (`labels`, rows of `embeddings`) that look wrong, most doubtful first.

    Only those with `eligible` True can be flagged; at most `max_share` of them (a model too weak to judge must not
    send the whole queue back). Deterministic for a given random_state."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    candidates = [i for i, ok in enumerate(eligible) if ok]
    if not candidates:
        return CheckResult([], 0, 0, skipped="no reviewed label settled by one person")
    names = [*base_labels, *labels]
    classes = sorted(set(names))
    counts = {c: names.count(c) for c in classes}
    if len(classes) < 2 or min(counts.values()) < MIN_PER_CLASS:
        rare = [c for c in classes if counts[c] < MIN_PER_CLASS]
        why = f"classes with fewer than {MIN_PER_CLASS} examples: {', '.join(rare)}" if rare else "only one class"
        return CheckResult([], len(candidates), 0, skipped=why)
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[c] for c in names])
    x = np.vstack([base_embeddings.reshape(len(base_labels), -1), embeddings]).astype(np.float64)
    n_splits = max(2, min(folds, min(counts.values())))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    model = LogisticRegression(max_iter=2000)
    probs = cross_val_predict(model, x, y, cv=cv, method="predict_proba")
    with warnings.catch_warnings():  # cleanlab warns about small classes; the cap below bounds what it can do
        warnings.simplefilter("ignore")
        ranked = find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence")
    offset = len(base_labels)
    allowed = {offset + i for i in candidates}
    flagged = [int(i) for i in ranked if int(i) in allowed]
    cap = int(max_share * len(candidates))
    suspects = [
        Suspect(
            index=i - offset,
            given=names[i],
            suggested=classes[int(probs[i].argmax())],
            quality=float(probs[i, y[i]]),
        )
        for i in flagged[:cap]
    ]
    return CheckResult(suspects, len(candidates), len(flagged))
