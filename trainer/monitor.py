"""The trainer's drift check: recent traffic against the served model's training data, a label-free estimate of
how the model does on it, both exported as metrics; a drifted check asks for a cycle now (scheduler.py).

Recent traffic is the newest randomly sampled pool items (`sampled_by` = random sample), not the uncertain
ones: the pool keeps every text the model was unsure of, and texts chosen *because* the model found them hard
differ from its training data by construction. The random sample is an unbiased draw of what callers send, which
is what the permutation test's null hypothesis (traffic = training distribution) is about.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardloop.models.registry import ModelRegistry, open_classifier
from guardloop.trainer.drift import DriftResult, estimate_performance, mmd_drift
from guardloop.trainer.embeddings import Embedder, SentenceEmbedder
from guardloop.trainer.reference import load_reference
from guardloop.trainer.training_set import base_training_sets

from guardloop.core import trainer_telemetry
from guardloop.core.settings import Settings
from guardloop.storage import RANDOM_SAMPLE, Database, PoolRepository, StoredItem

log = logging.getLogger(__name__)

# Fewer recent texts than this and the test has too little power to say anything either way.
MIN_RECENT_ITEMS = 30


@dataclass(frozen=True)
class DriftReport:
    outcome: str  # drifted, stable or skipped (trainer_telemetry.DRIFT_OUTCOMES)
    reason: str
    version: str | None = None
    drift: DriftResult | None = None
    estimate: dict[str, Any] | None = None
    start_cycle: bool = False  # a drifted check the first time for this served version


def recent_sampled(pool: PoolRepository, limit: int) -> list[StoredItem]:
    """The newest `limit` randomly sampled pool items (see the module docstring for why only those)."""
    sampled = [item for item in pool.iter_items() if item.sampled_by == RANDOM_SAMPLE]
    return sorted(sampled, key=lambda item: item.last_seen, reverse=True)[:limit]


class DriftMonitor:
    """One instance per trainer process; `check` is the scheduled job's body."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: ModelRegistry,
        *,
        embedder: Callable[[], Embedder] | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.registry = registry
        self.pool = PoolRepository(database)
        # Opened per check: the ONNX session is cheap to open and should not sit in memory between hourly checks.
        self._embedder = embedder or (lambda: SentenceEmbedder(settings.data_dir / "cache"))
        self._started_cycle_for: str | None = None
        trainer_telemetry.expose_trainer_metrics()

    def check(self) -> DriftReport:
        report = self._measure()
        estimate = report.estimate or {}
        per_class = estimate.get("per_class", {})
        trainer_telemetry.record_drift_check(
            report.outcome,
            drift=report.drift.as_json() if report.drift else None,
            precision={label: value.precision for label, value in per_class.items()},
            recall={label: value.recall for label, value in per_class.items()},
        )
        if report.drift:
            log.info(
                "drift check of %s: %s (MMD^2 %.5f, threshold %.5f, p %.3f, %d recent vs %d reference texts)",
                report.version,
                report.outcome,
                report.drift.score,
                report.drift.threshold,
                report.drift.p_value,
                report.drift.n_recent,
                report.drift.n_reference,
            )
        else:
            log.info("drift check skipped: %s", report.reason)
        if report.start_cycle:
            self._started_cycle_for = report.version
            trainer_telemetry.record_drift_cycle()
        return report

    def _measure(self) -> DriftReport:
        version = self.registry.current()
        if version is None:
            return DriftReport("skipped", "no model is published yet")
        self.database.ensure_schema()
        items = recent_sampled(self.pool, self.settings.drift_window_items)
        if len(items) < MIN_RECENT_ITEMS:
            return DriftReport(
                "skipped", f"{len(items)} randomly sampled pool items (need {MIN_RECENT_ITEMS})", version=version
            )
        embedder = self._embedder()
        reference = load_reference(self.registry.path(version))
        if reference is None:  # a version published before references existed: its base training data
            reference = embedder.embed([ex.text for ex in base_training_sets(self.settings)[0]])
        texts = [item.text for item in items]
        drift = mmd_drift(reference, embedder.embed(texts), alpha=self.settings.drift_alpha, seed=self.settings.seed)
        classifier = open_classifier(self.registry, version, max_seq_len=self.settings.max_seq_len)
        estimate = estimate_performance(classifier.predict_many(texts))
        start = drift.drifted and self.settings.drift_starts_cycle and self._started_cycle_for != version
        return DriftReport(
            "drifted" if drift.drifted else "stable",
            "recent traffic differs from the training data" if drift.drifted else "no significant difference",
            version=version,
            drift=drift,
            estimate=estimate,
            start_cycle=start,
        )


def build_monitor_job(settings: Settings, database: Database, registry: ModelRegistry) -> Callable[[], bool]:
    """The trainer's scheduled check: drift (metrics, and True when a cycle should start now), then the pool map
    redrawn into the ops directory for the service's /ops page. A failure is logged, never raised: the next
    check runs anyway, and the scheduler must not die of it."""
    from guardloop.trainer.pool_map import EmptyPool, render_pool_map  # matplotlib, only when a map is drawn

    monitor = DriftMonitor(settings, database, registry)

    def job() -> bool:
        start = False
        try:
            start = monitor.check().start_cycle
        except Exception:
            log.exception("drift check failed")
            trainer_telemetry.record_drift_check("skipped")
        if settings.pool_map_items:
            try:
                output = settings.pool_map_path
                timings = render_pool_map(
                    database,
                    lambda: SentenceEmbedder(settings.data_dir / "cache"),
                    output,
                    limit=settings.pool_map_items,
                    seed=settings.seed,
                )
                log.info("pool map of %d items drawn into %s %s", timings["items"], output, timings)
            except EmptyPool:
                pass
            except Exception:
                log.exception("pool map not drawn")
        return start

    return job
