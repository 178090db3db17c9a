"""The trainer's Prometheus metrics: cycles, the variation LLM, variations, label checks, drift and the label-free
estimates. Names, types, labels and buckets: k8s/METRICS.md. Exported by a process that runs cycles
(`expose_trainer_metrics`, called by `CycleRunner` and the drift monitor), never by the service alone.

What counts as what, where METRICS.md leaves a choice:
- Cycles: only finished ones, `promoted`, `rejected` or `failed`; a `skipped` cycle (empty pool, too few labels)
  trained nothing and is not counted, and a cycle waiting for reviewers is counted when it ends.
- LLM: one request = one ask for variations of one text, retries included (latency from the first attempt to
  the answer, the verifier's work after it not included); a text asked again because too few of its rewrites
  survived (`GUARDLOOP_LLM_ROUNDS`) counts once per ask. It fails when no usable answer came after the retries.
  Variations: `accepted` are kept, `filtered` every candidate line dropped (hygiene, the verifier, consistency with
  the current model, surplus beyond the item's budget).
"""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from guardloop.core.labels import LABELS
from guardloop.core.telemetry import expose

CYCLE_STEP_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

CYCLE_OUTCOMES = ("promoted", "rejected", "failed")
# The steps of trainer/cycle.py, in order (tests/test_metrics.py checks a real cycle against this list).
CYCLE_STEPS = (
    "snapshot pool",
    "embed",
    "score",
    "select",
    "request labels",
    "collect labels",
    "check labels",
    "generate variations",
    "build training set",
    "train and export",
    "evaluate",
    "gate",
    "publish",
)

CYCLE_STEP_SECONDS = Histogram(
    "guardloop_cycle_step_duration_seconds",
    "seconds each cycle step took",
    ["step"],
    buckets=CYCLE_STEP_BUCKETS,
    registry=None,
)
CYCLES = Counter(
    "guardloop_cycles_total", "finished cycles: promoted, rejected (gate said no) or failed", ["outcome"], registry=None
)
LAST_PROMOTED_MACRO_F1 = Gauge(
    "guardloop_last_promoted_macro_f1", "evaluation macro-F1 of the last promoted model", registry=None
)
LAST_PROMOTED_RECALL = Gauge(
    "guardloop_last_promoted_recall", "per-class evaluation recall of the last promoted model", ["label"], registry=None
)
LLM_REQUESTS = Counter("guardloop_llm_requests_total", "requests to the variation LLM", registry=None)
LLM_FAILURES = Counter(
    "guardloop_llm_failures_total",
    "LLM requests that failed after retries (timeout, error, unusable answer)",
    registry=None,
)
LLM_REQUEST_SECONDS = Histogram(
    "guardloop_llm_request_duration_seconds", "seconds per LLM request", buckets=LLM_BUCKETS, registry=None
)
VARIATIONS = Counter(
    "guardloop_variations_total", "generated variations: accepted or filtered", ["outcome"], registry=None
)
LABEL_SUSPECTS = Counter(
    "guardloop_label_suspects_total",
    "settled labels the label check doubted: withheld from training, sent to a second reviewer",
    registry=None,
)
LABEL_SUSPECTS_WAITING = Gauge(
    "guardloop_label_suspects_waiting",
    "doubted labels still waiting for their second reviewer (withheld from training until then)",
    registry=None,
)

DRIFT_OUTCOMES = ("drifted", "stable", "skipped")
DRIFT_SCORE = Gauge(
    "guardloop_drift_score", "MMD^2 of recent sampled traffic against the served model's training data", registry=None
)
DRIFT_THRESHOLD = Gauge(
    "guardloop_drift_threshold", "the drift score's permutation threshold (false-alarm rate alpha)", registry=None
)
DRIFT_P_VALUE = Gauge("guardloop_drift_p_value", "permutation p-value of the last drift check", registry=None)
DRIFT_RECENT_ITEMS = Gauge(
    "guardloop_drift_recent_items", "recent randomly sampled pool items the last drift check compared", registry=None
)
DRIFT_CHECKS = Counter(
    "guardloop_drift_checks_total",
    "drift checks: drifted, stable or skipped (no model, too few items)",
    ["outcome"],
    registry=None,
)
DRIFT_CYCLES = Counter(
    "guardloop_drift_cycles_triggered_total", "cycles started early because traffic drifted", registry=None
)
ESTIMATED_PRECISION = Gauge(
    "guardloop_estimated_precision",
    "label-free expected precision per class on recent sampled traffic (confidence-based estimate)",
    ["label"],
    registry=None,
)
ESTIMATED_RECALL = Gauge(
    "guardloop_estimated_recall",
    "label-free expected recall per class on recent sampled traffic (confidence-based estimate)",
    ["label"],
    registry=None,
)

TRAINER_METRICS: tuple[Collector, ...] = (
    CYCLE_STEP_SECONDS,
    CYCLES,
    LAST_PROMOTED_MACRO_F1,
    LAST_PROMOTED_RECALL,
    LLM_REQUESTS,
    LLM_FAILURES,
    LLM_REQUEST_SECONDS,
    VARIATIONS,
    LABEL_SUSPECTS,
    LABEL_SUSPECTS_WAITING,
    DRIFT_SCORE,
    DRIFT_THRESHOLD,
    DRIFT_P_VALUE,
    DRIFT_RECENT_ITEMS,
    DRIFT_CHECKS,
    DRIFT_CYCLES,
    ESTIMATED_PRECISION,
    ESTIMATED_RECALL,
)

# Every known label value exists at 0 from the start (as in core/telemetry.py).
_CYCLES = {outcome: CYCLES.labels(outcome=outcome) for outcome in CYCLE_OUTCOMES}
_RECALL = {label: LAST_PROMOTED_RECALL.labels(label=label) for label in LABELS}
_ACCEPTED, _FILTERED = VARIATIONS.labels(outcome="accepted"), VARIATIONS.labels(outcome="filtered")
_DRIFT_CHECKS = {outcome: DRIFT_CHECKS.labels(outcome=outcome) for outcome in DRIFT_OUTCOMES}
# No estimate yet reads NaN, not 0: a 0 would fire GuardloopEstimatedRecallLow before any check ran, while NaN
# compares false in every alert and shows as a gap on the dashboard.
for _label in LABELS:
    ESTIMATED_PRECISION.labels(label=_label).set(math.nan)
    ESTIMATED_RECALL.labels(label=_label).set(math.nan)
for _step in CYCLE_STEPS:
    CYCLE_STEP_SECONDS.labels(step=_step)


def expose_trainer_metrics() -> None:
    expose(TRAINER_METRICS)


def record_label_check(doubted: int, waiting: int) -> None:
    """One cycle's label check: labels it sent back for a second look, and how many such labels still wait."""
    LABEL_SUSPECTS.inc(doubted)
    LABEL_SUSPECTS_WAITING.set(waiting)


def record_cycle_outcome(outcome: str) -> None:
    """Count a finished cycle; other statuses (skipped, still waiting) are not outcomes."""
    counter = _CYCLES.get(outcome)
    if counter is not None:
        counter.inc()


def record_promoted_model(report: dict) -> None:
    """The evaluation report (trainer.evaluation.classification_report) of the model just promoted."""
    LAST_PROMOTED_MACRO_F1.set(report["macro_f1"])
    for label, recall in report["per_class_recall"].items():
        if label in _RECALL:
            _RECALL[label].set(recall)


def record_llm_request(seconds: float, *, failed: bool) -> None:
    LLM_REQUESTS.inc()
    LLM_REQUEST_SECONDS.observe(seconds)
    if failed:
        LLM_FAILURES.inc()


def record_variations(accepted: int, filtered: int) -> None:
    _ACCEPTED.inc(accepted)
    _FILTERED.inc(filtered)


def record_drift_check(
    outcome: str,
    *,
    drift: dict | None = None,
    precision: dict[str, float | None] | None = None,
    recall: dict[str, float | None] | None = None,
) -> None:
    """A finished drift check (trainer/monitor.py): its outcome, the test's figures, the label-free estimate.
    A class the estimate has no figure for (never predicted) reads NaN rather than keeping a stale figure."""
    _DRIFT_CHECKS[outcome].inc()
    if drift is not None:
        DRIFT_SCORE.set(drift["score"])
        DRIFT_THRESHOLD.set(drift["threshold"])
        DRIFT_P_VALUE.set(drift["p_value"])
        DRIFT_RECENT_ITEMS.set(drift["n_recent"])
    for gauge, values in ((ESTIMATED_PRECISION, precision), (ESTIMATED_RECALL, recall)):
        for label, value in (values or {}).items():
            gauge.labels(label=label).set(math.nan if value is None else value)


def record_drift_cycle() -> None:
    DRIFT_CYCLES.inc()
