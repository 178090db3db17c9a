"""The cycle's work on its labels between collecting them and training: the label check (suspected mislabels),
the oracle's second looks, and the LLM's variations. Plain functions over the cycle's repositories, so
trainer/cycle.py keeps the order of the steps and this module what each of these steps does."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.trainer import steps
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.labelers import ORACLE_SECOND_LOOK, OracleLabeler
from guardloop.trainer.training_set import is_gold
from guardloop.trainer.variations.companions import companions_for

from guardloop.core import trainer_telemetry
from guardloop.core.datafiles import Example
from guardloop.core.settings import Settings
from guardloop.storage import Database, ReviewError, ReviewRepository
from guardloop.storage.cycles import CycleRepository
from guardloop.storage.suspects import SuspectRepository, Suspicion

log = logging.getLogger(__name__)

# Builds a started-on-enter VariationGenerator given the current model's predict_proba.
OpenGenerator = Callable[[Callable[[list[str]], np.ndarray] | None], Any]


def check_labels(
    settings: Settings,
    database: Database,
    reviews: ReviewRepository,
    base_train: Sequence[Example],
    embedder: SentenceEmbedder,
    cycle_id: str,
    now: datetime,
) -> dict[str, Any]:
    """Suspected mislabels (label_check.py): withheld from this training (final_labels leaves them out from
    now on) and back in the queue for a second reviewer, whose answer settles them for the next cycle."""
    suspects = SuspectRepository(database)
    if not settings.label_check:
        return {"skipped": "label_check is off"}
    finals = reviews.final_labels()
    result = steps.check_labels(
        embedder,
        base_train,
        [(f.text, f.label) for f in finals],
        [not f.checked for f in finals],
        random_state=settings.seed,
        folds=settings.label_check_folds,
        max_share=settings.label_check_max_share,
    )
    doubted = [Suspicion(finals[s.index].item_id, s.given, s.suggested, s.quality) for s in result.suspects]
    suspected = suspects.mark(doubted, cycle_id=cycle_id, at=now)
    waiting = suspects.waiting()
    trainer_telemetry.record_label_check(suspected, waiting)
    detail: dict[str, Any] = {"checked": result.checked, "suspected": suspected, "withheld": waiting}
    if result.skipped:
        detail["skipped"] = result.skipped
    return detail


def oracle_second_looks(oracle: OracleLabeler, database: Database, reviews: ReviewRepository) -> int:
    """The oracle's second look at labels an earlier check doubted (see labelers.ORACLE_SECOND_LOOK)."""
    waiting = SuspectRepository(database).waiting_items()
    answers = steps.label(oracle, [text_hash for _, text_hash in waiting])
    given = 0
    for (item_id, _), label in zip(waiting, answers, strict=True):
        if label is not None:
            with contextlib.suppress(ReviewError):  # answered already (a resumed cycle)
                reviews.add_label(item_id, ORACLE_SECOND_LOOK, label)
                given += 1
    return given


def generate_variations(
    settings: Settings,
    reviews: ReviewRepository,
    cycles: CycleRepository,
    base_train: Sequence[Example],
    open_generator: OpenGenerator,
    cycle_id: str,
    current: OnnxClassifier | None,
) -> dict[str, Any]:
    """Variations of every settled label that has none yet, within the class-deficit budget; stored per item."""
    done = cycles.items_with_variations()
    todo = [  # a gold item's rewrites would leak it into training: none are made
        final
        for final in reviews.final_labels()
        if final.item_id not in done and not is_gold(final.item_id, settings.gold_share)
    ]
    if not todo:
        return {"items": 0}
    make = generator_variation_maker(open_generator)
    items = [(final.text, final.label) for final in todo]
    trained_labels = [ex.label or "" for ex in base_train]
    trained_labels += [f.label for f in reviews.final_labels()] + [y for _, y in cycles.variations()]
    budgets = steps.variation_budgets(settings.llm_variation_budget, items, trained_labels, settings.llm_variations)
    # What a short item may compose from: the base data and every trainable human label (gold stays out).
    labeled = [(ex.text, ex.label or "") for ex in base_train]
    labeled += [(f.text, f.label) for f in reviews.final_labels() if not is_gold(f.item_id, settings.gold_share)]
    companions = companions_for(items, labeled, settings.llm_compose_examples, random_state=settings.seed)
    try:
        generated = steps.generate(make, items, current.predict_proba if current else None, budgets, companions)
    except Exception as exc:  # the LLM could not even start: train on what we have, say why
        log.error("cycle %s: no variations: %s", cycle_id, exc)
        return {"items": len(todo), "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    accepted = 0
    for final, rewrites in zip(todo, generated.accepted, strict=True):
        accepted += cycles.add_variations(final.item_id, final.label, rewrites, cycle_id)
    return {
        "items": len(todo),
        "accepted": accepted,
        "filtered": generated.filtered,
        "failed_items": generated.failed_items,
        "verified": generated.verified,
        "rejected": generated.rejected,
        "composed": generated.composed,
        "not_asked": sum(1 for budget in budgets or [] if budget == 0),  # their class is not thin
    }


def generator_variation_maker(open_generator: OpenGenerator) -> steps.VariationMaker:
    """The variations step's maker for a live cycle: one started VariationGenerator per call, its consistency
    filter run with the current model."""

    def make(
        items: Sequence[tuple[str, str]],
        predict_proba: steps.Proba | None,
        wants: Sequence[int] | None,
        companions: Sequence[Sequence[str]] | None,
    ) -> steps.Generated:
        with open_generator(predict_proba) as generator:
            batch = generator.generate_many(list(items), wants=wants, companions=companions)
        return steps.Generated(
            accepted=[list(result.accepted) for result in batch.results],
            filtered=int(sum(sum(result.filtered.values()) for result in batch.results)),
            failed_items=len(batch.failed),
            verified=sum(result.verified for result in batch.results),
            rejected=sum(result.rejected for result in batch.results),
            composed=sum(result.composed for result in batch.results),
        )

    return make
