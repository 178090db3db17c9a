"""Every Prometheus metric of guardloop, in one place. Names, types, labels and buckets: k8s/METRICS.md.

The metrics are created unregistered and put into prometheus-client's default registry by role, so each process
exports only what it does: the service (`expose_service_metrics`, called by `create_app`) and a process that runs
cycles (`expose_trainer_metrics`, called by `CycleRunner`: `guardloop trainer`, `serve --with-trainer`). A trainer
that exported `guardloop_model_loaded 0` would page as "a replica without a model".

What counts as what, where METRICS.md leaves a choice:
- HTTP: every request, `/metrics`, `/healthz` and `/readyz` included, under its route template; a path that
  matches no route is `route="unmatched"`.
- Predictions, flags, uncertainty: the texts a caller sent (a conversation's last user turn, not the extra
  context window classified beside it); a text flagged in two categories counts once in each.
- Swaps: a served version replaced by another; the first load of a process is not a swap.
- Cycles: only finished ones, `promoted`, `rejected` or `failed`; a `skipped` cycle (empty pool, too few labels)
  trained nothing and is not counted, and a cycle waiting for reviewers is counted when it ends.
- LLM: one request = one ask for variations of one text, retries included (latency from the first attempt to
  the answer, the verifier's work after it not included); a text asked again because too few of its rewrites
  survived (`GUARDLOOP_LLM_ROUNDS`) counts once per ask. It fails when no usable answer came after the retries.
  Variations: `accepted` are kept, `filtered` every candidate line dropped (hygiene, the verifier, consistency with
  the current model, surplus beyond the item's budget).

With several worker processes (`GUARDLOOP_WORKERS`, service/workers.py) every value lives in a file per process
and /metrics sums counters and histograms over the workers; each gauge's `multiprocess_mode` says how its workers'
values combine: the model and policy in force per pod (`livemax`: 1 while any live worker serves that version;
`model_loaded` is `livemin`, 0 while any worker has none), the database gauges as last read (`mostrecent`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from guardloop.core import policy
from guardloop.core.labels import HARMFUL_LABELS, LABELS

if TYPE_CHECKING:
    from guardloop.models.onnx_model import Verdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNCERTAINTY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
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
UNMATCHED_ROUTE = "unmatched"

# --------------------------------------------------------------------------------------------- service
HTTP_REQUESTS = Counter(
    "guardloop_http_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=None
)
HTTP_REQUEST_SECONDS = Histogram(
    "guardloop_http_request_duration_seconds",
    "time from request received to response sent",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
PREDICTIONS = Counter("guardloop_predictions_total", "texts classified, by predicted label", ["label"], registry=None)
FLAGGED = Counter(
    "guardloop_flagged_total", "texts flagged (label's score reached its threshold), by label", ["label"], registry=None
)
UNCERTAINTY = Histogram(
    "guardloop_uncertainty",
    "uncertainty (entropy / log 6, 0-1) of each classified text",
    buckets=UNCERTAINTY_BUCKETS,
    registry=None,
)
BATCH_SIZE = Histogram(
    "guardloop_batch_size", "texts per micro-batch forward pass", buckets=BATCH_SIZE_BUCKETS, registry=None
)
REFUSAL_REASONS = ("overloaded", "client_requests", "client_work", "auth_failures")
REQUESTS_REFUSED = Counter(
    "guardloop_requests_refused_total",
    "requests refused unqueued: overloaded (503), client_requests / client_work / auth_failures (429)",
    ["reason"],
    registry=None,
)
TEXTS_REJECTED = Counter(
    "guardloop_texts_rejected_total",
    "texts that failed in a forward pass of their own (422); their batch-mates were answered",
    registry=None,
)
MODEL_INFO = Gauge(
    "guardloop_model_info",
    "1 for the model version this process serves",
    ["version"],
    registry=None,
    multiprocess_mode="livemax",
)
MODEL_LOADED = Gauge(
    "guardloop_model_loaded",
    "1 while a model is loaded (/readyz 200), else 0",
    registry=None,
    multiprocess_mode="livemin",
)
MODEL_LOAD_SECONDS = Gauge(
    "guardloop_model_load_seconds",
    "seconds the last successful load and warm-up took",
    registry=None,
    multiprocess_mode="livemax",
)
MODEL_SWAPS = Counter("guardloop_model_swaps_total", "hot-swaps to a new version", registry=None)
MODEL_SWAPS_REFUSED = Counter(
    "guardloop_model_swaps_refused_total",
    "versions refused (failed to load or warm up); the old one kept serving",
    registry=None,
)
POOL_WRITES = Counter("guardloop_pool_writes_total", "items written to the pool", registry=None)
POOL_DUPLICATES = Counter(
    "guardloop_pool_duplicates_total",
    "items that raised an existing row's counter instead of adding a row",
    registry=None,
)
POOL_DROPPED = Counter(
    "guardloop_pool_dropped_total",
    "items the pool writer dropped (buffer full while the database was slow or down)",
    registry=None,
)
POOL_SIZE = Gauge(
    "guardloop_pool_size",
    "items in the pool (read from the shared database)",
    registry=None,
    multiprocess_mode="mostrecent",
)
REVIEW_QUEUE_DEPTH = Gauge(
    "guardloop_review_queue_depth",
    "items waiting for a reviewer (read from the shared database)",
    registry=None,
    multiprocess_mode="mostrecent",
)
REVIEW_OLDEST_AGE = Gauge(
    "guardloop_review_oldest_item_age_seconds",
    "age of the oldest waiting item; 0 when the queue is empty (read from the shared database)",
    registry=None,
    multiprocess_mode="mostrecent",
)
LABELS_GIVEN = Counter("guardloop_labels_total", "labels given, by reviewer name", ["reviewer"], registry=None)
# Tenant label values come from the policy file only (its tenants and `default`), never from a caller: bounded.
POLICY_DECISIONS = Counter(
    "guardloop_policy_decisions_total",
    "texts decided under a tenant's policy: allow, review or block, per harmful category and overall",
    ["tenant", "category", "decision"],
    registry=None,
)
POLICY_RELOADS = Counter(
    "guardloop_policy_reloads_total",
    "policy files read: loaded, or refused (the old policy kept)",
    ["outcome"],
    registry=None,
)
POLICY_REFUSED = Gauge(
    "guardloop_policy_refused",
    "1 while the policy file on disk is refused and the previous policy decides",
    registry=None,
    multiprocess_mode="livemax",
)
POLICY_INFO = Gauge(
    "guardloop_policy_info",
    "1 for the policy version this process decides with",
    ["version"],
    registry=None,
    multiprocess_mode="livemax",
)

# --------------------------------------------------------------------------------------------- trainer
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

SERVICE_METRICS: tuple[Collector, ...] = (
    HTTP_REQUESTS,
    HTTP_REQUEST_SECONDS,
    PREDICTIONS,
    FLAGGED,
    UNCERTAINTY,
    BATCH_SIZE,
    REQUESTS_REFUSED,
    TEXTS_REJECTED,
    MODEL_INFO,
    MODEL_LOADED,
    MODEL_LOAD_SECONDS,
    MODEL_SWAPS,
    MODEL_SWAPS_REFUSED,
    POOL_WRITES,
    POOL_DUPLICATES,
    POOL_DROPPED,
    POOL_SIZE,
    REVIEW_QUEUE_DEPTH,
    REVIEW_OLDEST_AGE,
    LABELS_GIVEN,
    POLICY_DECISIONS,
    POLICY_RELOADS,
    POLICY_REFUSED,
    POLICY_INFO,
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

# Every known label value exists at 0 from the start: rate(), increase() and "always rejected" need the 0.
# The children are kept: the hot path then skips labels()'s lock and lookup.
_PREDICTED = {label: PREDICTIONS.labels(label=label) for label in LABELS}
_FLAGGED = {label: FLAGGED.labels(label=label) for label in LABELS}
_REFUSED = {reason: REQUESTS_REFUSED.labels(reason=reason) for reason in REFUSAL_REASONS}
_CYCLES = {outcome: CYCLES.labels(outcome=outcome) for outcome in CYCLE_OUTCOMES}
_RECALL = {label: LAST_PROMOTED_RECALL.labels(label=label) for label in LABELS}
_ACCEPTED, _FILTERED = VARIATIONS.labels(outcome="accepted"), VARIATIONS.labels(outcome="filtered")
_POLICY_LOADED, _POLICY_REFUSED = POLICY_RELOADS.labels(outcome="loaded"), POLICY_RELOADS.labels(outcome="refused")
_DRIFT_CHECKS = {outcome: DRIFT_CHECKS.labels(outcome=outcome) for outcome in DRIFT_OUTCOMES}
# No estimate yet reads NaN, not 0: a 0 would fire GuardloopEstimatedRecallLow before any check ran, while NaN
# compares false in every alert and shows as a gap on the dashboard.
for _label in LABELS:
    ESTIMATED_PRECISION.labels(label=_label).set(math.nan)
    ESTIMATED_RECALL.labels(label=_label).set(math.nan)
for _step in CYCLE_STEPS:
    CYCLE_STEP_SECONDS.labels(step=_step)


def _expose(collectors: Iterable[Collector]) -> None:
    for collector in collectors:
        with contextlib.suppress(ValueError):  # already exposed (a second app or runner in the same process)
            REGISTRY.register(collector)


def expose_service_metrics() -> None:
    _expose(SERVICE_METRICS)


def expose_trainer_metrics() -> None:
    _expose(TRAINER_METRICS)


def record_label_check(doubted: int, waiting: int) -> None:
    """One cycle's label check: labels it sent back for a second look, and how many such labels still wait."""
    LABEL_SUSPECTS.inc(doubted)
    LABEL_SUSPECTS_WAITING.set(waiting)


# --------------------------------------------------------------------------------------------- service events
def record_http_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_REQUEST_SECONDS.labels(route, method).observe(seconds)


def record_verdicts(verdicts: Sequence[Verdict]) -> None:
    for verdict in verdicts:
        _PREDICTED[verdict.label].inc()
        UNCERTAINTY.observe(verdict.uncertainty)
        for category in verdict.flagged_categories:
            _FLAGGED[category].inc()


def record_refused(reason: str) -> None:
    """A request refused unqueued (REFUSAL_REASONS), or a text rejected alone ("text_failed")."""
    if reason == "text_failed":
        TEXTS_REJECTED.inc()
    else:
        _REFUSED[reason].inc()


def _drop_versions(info: Gauge) -> None:
    """The old version's series goes: queries select the version whose value is 1. Zeroed first, since with
    several workers a removed series' last value stays in this process's file and would still read 1."""
    for family in info.collect():
        for sample in family.samples:
            info.labels(**sample.labels).set(0)
    info.clear()


def record_model_served(version: str, load_seconds: float, *, replaced: bool) -> None:
    _drop_versions(MODEL_INFO)
    MODEL_INFO.labels(version=version).set(1)
    MODEL_LOADED.set(1)
    MODEL_LOAD_SECONDS.set(load_seconds)
    if replaced:
        MODEL_SWAPS.inc()


def record_no_model() -> None:
    _drop_versions(MODEL_INFO)
    MODEL_LOADED.set(0)


def decision_counters(tenant: str) -> dict[tuple[str, str], Counter]:
    """Every (category or overall, decision) counter of one tenant, made at 0 when its policy loads: the request
    path then only increments, and rate() sees the 0."""
    categories = (*HARMFUL_LABELS, policy.OVERALL)
    return {(c, d): POLICY_DECISIONS.labels(tenant, c, d) for c in categories for d in policy.DECISIONS}


def record_policy_in_force(version: str, *, loaded: bool) -> None:
    """The policy version now deciding ("builtin" without a file); `loaded`: it was read from the file just now."""
    if loaded:
        _POLICY_LOADED.inc()
    POLICY_REFUSED.set(0)
    _drop_versions(POLICY_INFO)  # as for the model
    POLICY_INFO.labels(version=version).set(1)


def record_policy_refused() -> None:
    _POLICY_REFUSED.inc()
    POLICY_REFUSED.set(1)


def record_database_gauges(pool_size: int, queue_depth: int, oldest_age_seconds: float) -> None:
    POOL_SIZE.set(pool_size)
    REVIEW_QUEUE_DEPTH.set(queue_depth)
    REVIEW_OLDEST_AGE.set(oldest_age_seconds)


# --------------------------------------------------------------------------------------------- trainer events
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
