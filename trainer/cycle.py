"""One active-learning cycle: the steps of steps.py run against the database, the registry and the reviewers.

(advance a roll-out in progress) -> snapshot pool -> embed -> score -> select -> request labels -> collect labels
-> check labels -> generate variations -> build training set -> train (+ export) -> evaluate -> gate -> publish

A cycle is a database record (status, counts, per-step durations, metrics, reason). It may wait for
reviewers: it then stays `awaiting_labels`, and the next scheduled run resumes it once enough labels are in
or its deadline has passed. Runs are single-flight (a PostgreSQL advisory lock, or a file lock with SQLite),
and a run that dies mid-way is marked failed by the next one, which then starts cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from guardloop.models.onnx_model import OnnxClassifier
from guardloop.models.registry import ModelRegistry, RegistryError, open_classifier
from guardloop.trainer import cycle_labels, steps
from guardloop.trainer.embeddings import SentenceEmbedder
from guardloop.trainer.finetune import FineTuneConfig
from guardloop.trainer.gate import GateDecision, gate, rules_from
from guardloop.trainer.labelers import ORACLE_REVIEWER, OracleLabeler
from guardloop.trainer.rollout_step import advance_rollout, start_shadow
from guardloop.trainer.train import train_bootstrap_model
from guardloop.trainer.training_set import base_training_sets, eval_set, split_gold
from guardloop.trainer.variations import VariationGenerator
from guardloop.trainer.variations.verifier import lazy_embedder
from sqlalchemy.exc import SQLAlchemyError

from guardloop.core import trainer_telemetry
from guardloop.core.datafiles import Example
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import Database, LabelRequest, PoolRepository, ReviewRepository, StorageError
from guardloop.storage.cycles import (
    AWAITING_LABELS,
    FAILED,
    PROMOTED,
    REJECTED,
    SELECTING,
    SHADOWED,
    SKIPPED,
    TRAINING,
    CycleRepository,
    CycleView,
)
from guardloop.storage.locks import CycleBusy, single_flight

log = logging.getLogger(__name__)

# Kept importable from here: tests and scripts name them as guardloop.trainer.cycle.*
__all__ = [
    "ORACLE_REVIEWER",
    "CycleBusy",
    "CycleRunner",
    "GateDecision",
    "OracleLabeler",
    "base_training_sets",
    "build_cycle_runner",
    "gate",
    "single_flight",
    "train_bootstrap_model",
]


# --------------------------------------------------------------------------------------------- the runner
@dataclass
class CycleRunner:
    settings: Settings
    database: Database
    registry: ModelRegistry
    oracle: OracleLabeler | None = None
    # Builds a started-on-enter VariationGenerator given the current model's predict_proba; None: no variations.
    variation_generator: Callable[[Callable[[list[str]], np.ndarray] | None], Any] | None = None
    progress: bool = False
    on_step: Callable[[str, float], None] | None = None
    _steps: list[dict[str, Any]] = field(default_factory=list)
    _base: tuple[list[Example], list[Example]] | None = None  # _base_sets(): read once per run

    def __post_init__(self) -> None:
        self.pool = PoolRepository(self.database)
        self.reviews = ReviewRepository(
            self.database,
            labels_per_item=self.settings.review_labels_per_item,
            second_opinion_share=self.settings.review_second_opinion_share,
        )
        self.cycles = CycleRepository(self.database)
        trainer_telemetry.expose_trainer_metrics()  # a process that runs cycles exports the cycle and LLM metrics

    # ------------------------------------------------------------------------------------- entry point
    def run(self, *, now: datetime | None = None) -> CycleView:
        """Run (or resume) one cycle under the single-flight lock; returns its record as it ends this run."""
        self.database.ensure_schema()
        self._base = None  # the operator may have changed the base files since the last run
        with single_flight(self.database, self.settings.data_dir):
            self._fail_interrupted()
            self.registry.remove_stale_staging()
            self._advance_rollout()  # the promote-shadow step: the roll-out a previous cycle started moves on
            waiting = [c for c in self.cycles.in_progress() if c.status == AWAITING_LABELS]
            cycle = waiting[0] if waiting else self._start()
            self._steps = list(cycle.steps)
            try:
                if cycle.status == SELECTING:
                    cycle = self._select(cycle, now or datetime.now(UTC))
                if cycle.status == AWAITING_LABELS:
                    cycle = self._collect_and_train(cycle, now or datetime.now(UTC))
            except Exception as exc:
                log.exception("cycle %s failed", cycle.id)
                self.cycles.update(cycle.id, status=FAILED, reason=f"{type(exc).__name__}: {exc}", steps=self._steps)
            finished: CycleView = self.cycles.get(cycle.id)  # type: ignore[assignment]
        trainer_telemetry.record_cycle_outcome(finished.status)  # skipped and still-waiting runs are not outcomes
        if finished.status == PROMOTED:
            self.export_last_promoted()
        return finished

    def export_last_promoted(self) -> None:
        """Set the last promoted model's gauges from the database (also at trainer start, so a restart keeps them)."""
        try:
            self.database.ensure_schema()
            last = self.cycles.last_promoted()
        except (StorageError, SQLAlchemyError) as exc:  # best effort: the next promotion sets them anyway
            log.warning("last promoted model's metrics not exported: %s", exc)
            return
        if last is not None and last.metrics.get("candidate"):
            trainer_telemetry.record_promoted_model(last.metrics["candidate"])

    def _advance_rollout(self) -> None:
        try:
            step = advance_rollout(self.settings, self.registry, self.database)
        except (RegistryError, StorageError, SQLAlchemyError) as exc:  # the cycle itself can still run
            log.error("roll-out step failed: %s", exc)
            return
        if step.action not in ("none", "wait"):
            log.info("roll-out: %s %s: %s", step.action, step.candidate, step.reason)

    def _fail_interrupted(self) -> None:
        # We hold the lock, so an in-progress cycle that is not waiting for people belongs to a dead process.
        for cycle in self.cycles.in_progress():
            if cycle.status != AWAITING_LABELS:
                log.warning("cycle %s was interrupted during %s; marking it failed", cycle.id, cycle.status)
                self.cycles.update(cycle.id, status=FAILED, reason=f"interrupted during {cycle.status}")
                trainer_telemetry.record_cycle_outcome(FAILED)  # its own process died before it could count it

    def _start(self) -> CycleView:
        cycle_id = f"c{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        return self.cycles.create(
            cycle_id,
            strategy=self.settings.cycle_strategy,
            budget=self.settings.cycle_budget,
            parent_version=self.registry.current(),
        )

    @contextlib.contextmanager
    def _step(self, cycle: CycleView, name: str) -> Iterator[dict[str, Any]]:
        detail: dict[str, Any] = {}
        started = time.perf_counter()
        log.info("cycle %s: %s ...", cycle.id, name)
        yield detail
        seconds = time.perf_counter() - started
        self._steps.append({"step": name, "seconds": round(seconds, 2), **detail})
        self.cycles.update(cycle.id, steps=self._steps)
        log.info("cycle %s: %s done in %.1fs %s", cycle.id, name, seconds, detail or "")
        trainer_telemetry.CYCLE_STEP_SECONDS.labels(step=name).observe(seconds)
        if self.on_step:
            self.on_step(name, seconds)

    def _base_sets(self) -> tuple[list[Example], list[Example]]:
        """The base training data (train, dev), read once per run: every step of a run sees the same files."""
        if self._base is None:
            self._base = base_training_sets(self.settings)
        return self._base

    def _current_classifier(self) -> OnnxClassifier | None:
        version = self.registry.current()
        if version is None:
            return None
        return open_classifier(self.registry, version, max_seq_len=self.settings.max_seq_len)

    # ------------------------------------------------------------------------------------- select
    def _select(self, cycle: CycleView, now: datetime) -> CycleView:
        with self._step(cycle, "snapshot pool") as detail:
            labeled_ids = {final.item_id for final in self.reviews.final_labels()}
            items = steps.snapshot(
                list(self.pool.iter_items(unrequested_only=True)), labeled_ids, self.settings.cycle_max_pool
            )
            detail["pool_items"] = len(items)
        if not items:
            self.cycles.update(cycle.id, status=SKIPPED, reason="the pool has no unrequested items", steps=self._steps)
            return self.cycles.get(cycle.id)  # type: ignore[return-value]

        with self._step(cycle, "embed") as detail:
            embedder = SentenceEmbedder(self.settings.data_dir / "cache")
            embeddings = steps.embed(embedder, [item.text for item in items])
            finals = self.reviews.final_labels()
            base = self._base_sets()[0]
            # Row for row with the labels handed to the strategy below: base data, then reviewed labels.
            labeled_embeddings = steps.embed(embedder, [ex.text for ex in base] + [final.text for final in finals])
            detail["texts"] = len(items)
        with self._step(cycle, "score") as detail:
            classifier = self._current_classifier()
            logged = np.array([[item.scores[label] for label in LABELS] for item in items])
            probs = steps.score(classifier, [item.text for item in items], fallback=logged)
            detail["model"] = classifier.version if classifier else "scores logged at classification time"
        with self._step(cycle, "select") as detail:
            selections = steps.select(
                self.settings.cycle_strategy,
                embeddings,
                probs,
                self.settings.cycle_budget,
                labeled_embeddings=labeled_embeddings,
                labeled_labels=[ex.label or "" for ex in base] + [final.label for final in finals],
                random_state=self.settings.seed + int(now.timestamp()) % 100_000,
                n_clusters=self.settings.cycle_clusters,
            )
            detail["selected"] = len(selections)
            detail["predicted"] = steps.predicted_counts(selections, probs)
        with self._step(cycle, "request labels") as detail:
            requests = [
                LabelRequest(
                    items[s.index].id,
                    # The picking model's probabilities: the review page explains the pick with these, not with
                    # the (possibly older) ones logged when the text was classified.
                    {
                        **s.reason,
                        "cycle_id": cycle.id,
                        "scores": {label: round(float(p), 4) for label, p in zip(LABELS, probs[s.index], strict=True)},
                        "scored_by": classifier.version if classifier else None,
                    },
                    priority=float(s.reason.get("uncertainty", 0.0)),
                )
                for s in selections
            ]
            self.pool.mark_requested(requests, at=now)
            detail["requested"] = len(requests)
        deadline = now + timedelta(hours=self.settings.cycle_label_deadline_hours)
        self.cycles.update(
            cycle.id,
            status=AWAITING_LABELS,
            label_deadline=deadline,
            counts={"pool_items": len(items), "requested": len(requests)},
            steps=self._steps,
        )
        return self.cycles.get(cycle.id)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- collect, train, gate
    def _collect_and_train(self, cycle: CycleView, now: datetime) -> CycleView:
        counts = dict(cycle.counts)
        with self._step(cycle, "collect labels") as detail:
            requested = [
                item
                for item in self.pool.iter_items(requested_only=True)
                if (item.request_reason or {}).get("cycle_id") == cycle.id
            ]
            if self.oracle is not None:
                answered = 0
                answers = steps.label(self.oracle, [item.text_hash for item in requested])
                for item, label in zip(requested, answers, strict=True):
                    if label is None:
                        continue
                    with contextlib.suppress(Exception):  # already answered (a resumed cycle): keep the first answer
                        self.reviews.add_label(item.id, ORACLE_REVIEWER, label)
                        answered += 1
                detail["oracle_answers"] = answered
                detail["oracle_second_looks"] = self._oracle_second_looks()
            finals = self.reviews.final_labels(cycle_id=cycle.id)
            detail["labeled"] = len(finals)
            detail["requested"] = len(requested)
        counts["labeled"] = len(finals)
        deadline = cycle.label_deadline or now
        if len(finals) < len(requested) and now < deadline:
            self.cycles.update(cycle.id, counts=counts, steps=self._steps)
            log.info("cycle %s: %d of %d labels in; waiting until %s", cycle.id, len(finals), len(requested), deadline)
            return self.cycles.get(cycle.id)  # type: ignore[return-value]
        if len(finals) < self.settings.cycle_min_labels:
            self.pool.withdraw_requests([item.id for item in requested])
            reason = (
                f"only {len(finals)} labels by the deadline (need {self.settings.cycle_min_labels}); requests withdrawn"
            )
            self.cycles.update(cycle.id, status=SKIPPED, reason=reason, counts=counts, steps=self._steps)
            return self.cycles.get(cycle.id)  # type: ignore[return-value]

        self.cycles.update(cycle.id, status=TRAINING, counts=counts, steps=self._steps)
        with self._step(cycle, "check labels") as detail:
            detail.update(self._check_labels(cycle, now))
        counts.update({f"label_check_{k}": v for k, v in detail.items() if isinstance(v, int)})
        current = self._current_classifier()
        with self._step(cycle, "generate variations") as detail:
            detail.update(self._generate_variations(cycle, current))
        counts.update({f"variations_{k}": v for k, v in detail.items() if isinstance(v, int)})

        with self._step(cycle, "build training set") as detail:
            base_train, dev = self._base_sets()
            # The gold reserve (training_set.py) is never trained on, nor are its items' variations.
            trainable, gold = split_gold(self.reviews.final_labels(), lambda f: f.item_id, self.settings.gold_share)
            human = [(f.text, f.label) for f in trainable]
            variations = self.cycles.variations(exclude_items=[f.item_id for f in gold])
            train = steps.build(base_train, human, variations)
            detail.update(
                base=len(base_train), human_labels=len(human), gold=len(gold), variations=len(variations), dev=len(dev)
            )
        counts.update(
            train_size=len(train), human_labels_total=len(human), gold_total=len(gold), variations_total=len(variations)
        )
        self.cycles.update(cycle.id, counts=counts)

        held_out = eval_set(self.settings)
        with tempfile.TemporaryDirectory(prefix="guardloop-cycle-") as tmp:
            with self._step(cycle, "train and export") as detail:
                limit = self.settings.teacher_unlabeled_max if self.settings.teacher else 0  # only a teacher reads it
                judged = [ex.text for ex in [*train, *dev, *held_out]] + [f.text for f in gold]  # never unlabeled
                unlabeled = steps.distillation_texts(self.pool.iter_items(), judged, limit)
                detail["unlabeled"] = len(unlabeled)
                staging, card = steps.train(
                    train,
                    dev,
                    FineTuneConfig(seed=self.settings.seed, epochs=self.settings.cycle_epochs),
                    Path(tmp),
                    fingerprints={"cycle": cycle.id},
                    cache_dir=self.settings.data_dir / "cache",
                    progress=self.progress,
                    base_model=self.settings.base_model,
                    teacher=self.settings.teacher,
                    unlabeled=unlabeled,
                    reference_texts=[ex.text for ex in base_train] + [text for text, _ in human],
                    average_of=self.settings.train_average_of,
                )
                detail["dev_macro_f1"] = (card.metrics.get("dev") or {}).get("macro_f1")
                detail["onnx_agreement"] = card.metrics["onnx_check"]["agreement"]
            with self._step(cycle, "evaluate") as detail:
                candidate = steps.open_candidate(staging, max_seq_len=self.settings.max_seq_len)
                # Both sets are scored and recorded; the gate judges on gold once it is large enough.
                fixed = steps.judge("eval set", candidate, current, held_out)
                gold_examples = [Example(f.text, f.label) for f in gold]
                gold_set = steps.judge("gold reserve", candidate, current, gold_examples) if gold else None
                judged, gate_note = steps.gate_set(fixed, gold_set, self.settings.gold_min_per_class)
                detail["gate_set"] = judged.name
                detail["candidate_macro_f1"] = judged.candidate["macro_f1"]
                detail["current_macro_f1"] = judged.current["macro_f1"] if judged.current else None
            with self._step(cycle, "gate") as detail:
                decision = steps.gate(judged, rules_from(self.settings))
                detail["promote"] = decision.promote
            reason = f"{decision.reason}; {gate_note}"
            metrics = steps.gate_record(
                judged, decision, reason, fixed, gold_set, [f.label for f in gold], self.settings.gold_min_per_class
            )
            if not decision.promote:
                self.cycles.update(cycle.id, status=REJECTED, reason=reason, metrics=metrics, steps=self._steps)
                return self.cycles.get(cycle.id)  # type: ignore[return-value]
            with self._step(cycle, "publish") as detail:
                version = steps.publish(
                    self.registry,
                    staging,
                    card,
                    eval_report=judged.candidate,
                    cycle_id=cycle.id,
                    make_current=not self.settings.rollout_shadow,
                )
                detail["version"] = version
                if self.settings.rollout_shadow:  # first a shadow beside the served model (trainer/rollout_step.py)
                    detail["rollout"] = start_shadow(self.registry, version, f"cycle {cycle.id} passed the gate")
        status = SHADOWED if self.settings.rollout_shadow else PROMOTED
        self.cycles.update(
            cycle.id, status=status, model_version=version, reason=reason, metrics=metrics, steps=self._steps
        )
        return self.cycles.get(cycle.id)  # type: ignore[return-value]

    def _check_labels(self, cycle: CycleView, now: datetime) -> dict[str, Any]:
        embedder = SentenceEmbedder(self.settings.data_dir / "cache")
        return cycle_labels.check_labels(
            self.settings, self.database, self.reviews, self._base_sets()[0], embedder, cycle.id, now
        )

    def _oracle_second_looks(self) -> int:
        assert self.oracle is not None
        return cycle_labels.oracle_second_looks(self.oracle, self.database, self.reviews)

    def _generate_variations(self, cycle: CycleView, current: OnnxClassifier | None) -> dict[str, Any]:
        if self.variation_generator is None:
            return {"skipped": "no LLM configured"}
        return cycle_labels.generate_variations(
            self.settings, self.reviews, self.cycles, self._base_sets()[0], self.variation_generator, cycle.id, current
        )


def build_cycle_runner(settings: Settings, *, oracle: Path | None = None, progress: bool = False) -> CycleRunner:
    oracle_path = oracle or settings.cycle_oracle_file
    return CycleRunner(
        settings=settings,
        database=Database(settings.database_url_value),
        registry=ModelRegistry(settings.registry_dir),
        oracle=OracleLabeler(oracle_path) if oracle_path else None,
        variation_generator=lambda proba: VariationGenerator.from_settings(
            settings,
            predict_proba=proba,
            # The verifier's drift check embeds with the embedder the select step uses (its cache is shared).
            embed=lazy_embedder(settings.data_dir / "cache") if settings.llm_verify else None,
        ),
        progress=progress,
    )
