"""The steps of one active-learning cycle, as plain functions over plain data.

    snapshot -> embed -> score -> select -> request labels -> collect labels (label) -> generate variations
    -> build training set -> train (+ export) -> evaluate -> gate -> publish

`CycleRunner` (cycle.py) runs them against the database, the registry and the reviewers; `Simulation`
(simulate.py) runs the same functions against an in-memory pool, an oracle and no registry. Whatever changes
here (a strategy, the variations, the training recipe) is therefore measured by `simulate` exactly as the
production cycle will run it. The request, collect and publish sides that only a database or a registry has
stay in cycle.py; everything that decides what is picked, learned and promoted is here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelCard, ModelRegistry
from guardloop.trainer import evaluation, label_check
from guardloop.trainer import gate as gate_module
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.finetune import FineTuneConfig
from guardloop.trainer.labelers import OracleLabeler
from guardloop.trainer.strategies import Selection, make_strategy
from guardloop.trainer.train import TrainJob, train_model
from guardloop.trainer.training_set import gold_ready
from guardloop.trainer.variations.budget import variation_budget

from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS

Proba = Callable[[list[str]], np.ndarray]  # texts -> (n, 6) probabilities in LABELS order


class _Recent(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def last_seen(self) -> datetime: ...


R = TypeVar("R", bound=_Recent)


@dataclass(frozen=True)
class Generated:
    """What the variations step gives back: the accepted rewrites of each item, and what was thrown away."""

    accepted: list[list[str]]
    filtered: int = 0
    failed_items: int = 0
    verified: int = 0  # rewrites the verifier judged
    rejected: int = 0  # of those, rejected by it
    composed: int = 0  # of the accepted, new posts written from several labeled texts of a class (not rewrites)


VariationMaker = Callable[
    [Sequence[tuple[str, str]], Proba | None, Sequence[int] | None, Sequence[Sequence[str]] | None], Generated
]
"""(items, the current model's predict_proba, how many variations each item wants or None for k, per item the
other labeled texts of its class to compose from when its rewrites fall short or None) -> Generated."""


def snapshot(items: Sequence[R], exclude_ids: set[int], limit: int) -> list[R]:
    """The newest `limit` pool items (id, last_seen) that are not labeled already."""
    fresh = [item for item in items if item.id not in exclude_ids]
    return sorted(fresh, key=lambda item: item.last_seen, reverse=True)[:limit]


def distillation_texts(items: Iterable[Any], exclude: Iterable[str], limit: int) -> list[str]:
    """The newest `limit` pool texts outside `exclude` (what the student trains on by label, and every text an
    evaluation judges it on: gold reserve, eval set, dev): the teacher's soft labels on them carry the
    deployment's own traffic into the student. `items`: pool items (id, text, last_seen)."""
    if limit <= 0:
        return []  # the items are not even read
    excluded = set(exclude)
    return [item.text for item in snapshot([item for item in items if item.text not in excluded], set(), limit)]


def embed(embedder: SentenceEmbedder, texts: Sequence[str]) -> np.ndarray:
    """Sentence embeddings (the strategies' notion of "similar"), cached by text."""
    return embedder.embed(list(texts))


def score(classifier: OnnxClassifier | None, texts: Sequence[str], fallback: np.ndarray | None = None) -> np.ndarray:
    """The current model's probabilities for `texts`; without a model, `fallback` (e.g. the scores logged at
    classification time)."""
    if classifier is None:
        if fallback is None:
            raise ValueError("no model to score with and no fallback scores")
        return fallback
    return classifier.predict_many(list(texts))


def select(
    strategy: str,
    embeddings: np.ndarray,
    probs: np.ndarray,
    budget: int,
    *,
    labeled_embeddings: np.ndarray | None,
    labeled_labels: Sequence[str],
    random_state: int,
    n_clusters: int | None = None,
) -> list[Selection]:
    """`budget` candidates picked by the named query strategy, each with the reason it was picked.
    `labeled_labels`: the labels already learned from (base data and earlier answers), for the strategies that
    favour the classes least represented among them."""
    return make_strategy(strategy, n_clusters=n_clusters).select(
        embeddings,
        probs,
        budget,
        labeled_embeddings=labeled_embeddings,
        labeled_labels=list(labeled_labels),
        random_state=random_state,
    )


def predicted_counts(selections: Sequence[Selection], probs: np.ndarray) -> dict[str, int]:
    """How many of the picks the current model puts in each class (a cycle record's "predicted")."""
    return {label: sum(1 for s in selections if LABELS[int(probs[s.index].argmax())] == label) for label in LABELS}


def label(labeler: OracleLabeler, text_hashes: Sequence[str]) -> list[str | None]:
    """The oracle's answers to label requests (None: it has no label for that text)."""
    return labeler.labels_of(text_hashes)


def variation_budgets(
    how: str, items: Sequence[tuple[str, str]], train_labels: Sequence[str], k: int
) -> list[int] | None:
    """Variations per new item: "deficit" sends them to the classes `train_labels` (the training set so far) has
    fewest of (variations/budget.py); "uniform" (None) asks k for every item, as the paper does."""
    if how == "uniform":
        return None
    return variation_budget([label for _, label in items], Counter(train_labels), k)


def generate(
    make: VariationMaker | None,
    items: Sequence[tuple[str, str]],
    predict_proba: Proba | None,
    budgets: Sequence[int] | None = None,
    companions: Sequence[Sequence[str]] | None = None,
) -> Generated:
    """Label-preserving LLM rewrites of newly labeled items, verified and filtered by the current model's
    consistency check. With `budgets`, items with 0 are not sent, the others are asked for their budget, and each
    keeps at most its budget (a maker may return more). `companions` (variations.companions): per item, what the maker
    may compose new posts of its class from when its rewrites fall short of its budget."""
    if make is None or not items:
        return Generated([[] for _ in items])
    if companions is not None and len(companions) != len(items):
        raise ValueError(f"{len(companions)} companion lists for {len(items)} items")
    if budgets is None:
        return make(items, predict_proba, None, companions)
    todo = [i for i, budget in enumerate(budgets) if budget > 0]
    sent = None if companions is None else [companions[i] for i in todo]
    made = make([items[i] for i in todo], predict_proba, [budgets[i] for i in todo], sent) if todo else Generated([])
    accepted: list[list[str]] = [[] for _ in items]
    for i, rewrites in zip(todo, made.accepted, strict=True):
        accepted[i] = rewrites[: budgets[i]]
    return Generated(accepted, made.filtered, made.failed_items, made.verified, made.rejected, made.composed)


def check_labels(
    embedder: SentenceEmbedder,
    base: Sequence[Example],
    reviewed: Sequence[tuple[str, str]],
    eligible: Sequence[bool],
    *,
    random_state: int,
    folds: int,
    max_share: float,
) -> label_check.CheckResult:
    """Before training: the reviewed (text, label) pairs whose label looks wrong (label_check.py), judged by
    out-of-fold predictions over the base set and the reviewed labels. The caller withholds them from this training
    and has a second reviewer look; only pairs with `eligible` True (one person's label) can be named."""
    return label_check.find_suspects(
        embed(embedder, [ex.text for ex in base]),
        [ex.label or "" for ex in base],
        embed(embedder, [text for text, _ in reviewed]),
        [label for _, label in reviewed],
        eligible,
        random_state=random_state,
        folds=folds,
        max_share=max_share,
    )


def build(
    base: Sequence[Example], human: Sequence[tuple[str, str]], variations: Sequence[tuple[str, str]]
) -> list[Example]:
    """The training set: the base data, every human (or oracle) label so far, every accepted variation."""
    return [*base, *(Example(t, y) for t, y in human), *(Example(t, y) for t, y in variations)]


def train(
    examples: Sequence[Example],
    dev: Sequence[Example],
    config: FineTuneConfig,
    work_dir: Path,
    *,
    fingerprints: dict[str, str],
    cache_dir: Path,
    progress: bool = False,
    base_model: Path | None = None,
    teacher: str | Path | None = None,
    unlabeled: Sequence[str] = (),
    reference_texts: Sequence[str] | None = None,
    average_of: int = 1,
) -> tuple[Path, ModelCard]:
    """Fine-tune, export int8 ONNX and check it against torch, into `work_dir`: (staging dir, unpublished card).
    `base_model`, `teacher`: settings.base_model and settings.teacher (None: MiniLM, no distillation).
    `unlabeled`: texts the teacher soft-labels for the student (the cycle's pool); ignored without a teacher.
    `reference_texts`: what the drift reference is drawn from (TrainJob says why variations stay out of it).
    `average_of`: settings.train_average_of (averaging.py)."""
    job = TrainJob(
        train=examples,
        dev=dev,
        config=config,
        fingerprints=fingerprints,
        cache_dir=cache_dir,
        progress=progress,
        base_model=base_model,
        teacher=teacher,
        unlabeled=unlabeled,
        reference_texts=reference_texts,
        average_of=average_of,
    )
    return train_model(job, work_dir)


def open_candidate(staging: Path, *, max_seq_len: int) -> OnnxClassifier:
    """The trained, not yet published model as the service would run it (int8 ONNX)."""
    return OnnxClassifier(staging, version="candidate", threads=2, max_seq_len=max_seq_len)


def predict(classifier: OnnxClassifier, examples: Sequence[Example]) -> tuple[dict[str, Any], list[str]]:
    """(report, predicted label per example) of the served model, one text per forward pass as served."""
    probs = evaluation.served_probs(classifier, examples)
    return evaluation.report_from_probs(examples, probs), [LABELS[i] for i in probs.argmax(axis=1)]


@dataclass(frozen=True)
class Judged:
    """One labeled set scored by the candidate and the current model (None: there is none): their reports, and
    each one's prediction per item, which the gate compares item by item."""

    name: str
    y_true: list[str]
    candidate: dict[str, Any]
    candidate_pred: list[str]
    current: dict[str, Any] | None = None
    current_pred: list[str] | None = None

    def record(self) -> dict[str, Any]:
        """What a cycle record keeps of it."""
        return {"n": len(self.y_true), "candidate": self.candidate, "current": self.current}


def judge(name: str, candidate: OnnxClassifier, current: OnnxClassifier | None, examples: Sequence[Example]) -> Judged:
    """Both models on `examples`."""
    report, predicted = predict(candidate, examples)
    current_report, current_pred = predict(current, examples) if current is not None else (None, None)
    return Judged(name, [ex.label or "" for ex in examples], report, predicted, current_report, current_pred)


def gate_set(seed_eval: Judged, gold: Judged | None, min_per_class: int) -> tuple[Judged, str]:
    """The set the gate judges on: the gold reserve once it holds `min_per_class` items of every class, the seed
    eval set before that; and a note saying which and why."""
    if gold is not None and gold_ready(gold.y_true, min_per_class):
        return gold, f"judged on the gold reserve ({len(gold.y_true)} items)"
    held = len(gold.y_true) if gold is not None else 0
    return seed_eval, f"gold reserve has {held} items, below {min_per_class} of every class: judged on {seed_eval.name}"


def gate_record(
    judged: Judged,
    decision: gate_module.GateDecision,
    reason: str,
    seed_eval: Judged,
    gold: Judged | None,
    gold_labels: Sequence[str],
    min_per_class: int,
) -> dict[str, Any]:
    """What a cycle record keeps of its evaluation and gate: both sets' numbers, which one the gate judged on, and
    how full the gold reserve is."""
    return {
        "candidate": judged.candidate,  # on the set the gate judged on (gate_set)
        "current": judged.current,
        "gate": reason,
        "gate_set": judged.name,
        "gate_drops": decision.drops,
        "eval_examples": len(seed_eval.y_true),
        "eval_sets": {
            seed_eval.name: seed_eval.record(),
            "gold reserve": {
                **(gold.record() if gold else {"n": 0}),
                "per_class": {label: sum(y == label for y in gold_labels) for label in LABELS},
                "min_per_class": min_per_class,
            },
        },
    }


def gate(judged: Judged, rules: gate_module.GateRules) -> gate_module.GateDecision:
    """Whether the candidate may replace the current model (see gate.py): a paired comparison on `judged`."""
    return gate_module.gate(judged.y_true, judged.candidate_pred, judged.current_pred, rules, set_name=judged.name)


def publish(
    registry: ModelRegistry,
    staging: Path,
    card: ModelCard,
    *,
    eval_report: dict[str, Any],
    cycle_id: str,
    make_current: bool = True,
) -> str:
    """Publish the candidate as the registry's new version (parent: the old current); current unless `make_current`
    is False, when a roll-out starts from it instead (trainer/rollout_step.py)."""
    version = registry.new_version_name()
    card = card.model_copy(
        update={
            "version": version,
            "parent": registry.current(),
            "metrics": {**card.metrics, "eval": eval_report, "cycle": cycle_id},
        }
    )
    registry.publish(staging, card, make_current=make_current)
    return version
