"""The service's Prometheus metrics. Names, types, labels and buckets: k8s/METRICS.md; the trainer's metrics (cycles,
LLM, variations, drift) are in core/trainer_telemetry.py.

The metrics are created unregistered and put into prometheus-client's default registry by role, so each process
exports only what it does: the service (`expose_service_metrics`, called by `create_app`) and a process that runs
cycles (`trainer_telemetry.expose_trainer_metrics`, called by `CycleRunner`: `guardloop trainer`,
`serve --with-trainer`). A trainer that exported `guardloop_model_loaded 0` would page as "a replica without a
model".

What counts as what, where METRICS.md leaves a choice:
- HTTP: every request, `/metrics`, `/healthz` and `/readyz` included, under its route template; a path that
  matches no route is `route="unmatched"`.
- Predictions, flags, uncertainty: the texts a caller sent (a conversation's last user turn, not the extra
  context window classified beside it); a text flagged in two categories counts once in each.
- Swaps: a served version replaced by another; the first load of a process is not a swap.

With several worker processes (`GUARDLOOP_WORKERS`, service/workers.py) every value lives in a file per process
and /metrics sums counters and histograms over the workers; each gauge's `multiprocess_mode` says how its workers'
values combine: the model and policy in force per pod (`livemax`: 1 while any live worker serves that version;
`model_loaded` is `livemin`, 0 while any worker has none), the database gauges as last read (`mostrecent`).
"""

from __future__ import annotations

import contextlib
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
# Every known label value exists at 0 from the start: rate(), increase() and "always rejected" need the 0.
# The children are kept: the hot path then skips labels()'s lock and lookup.
_PREDICTED = {label: PREDICTIONS.labels(label=label) for label in LABELS}
_FLAGGED = {label: FLAGGED.labels(label=label) for label in LABELS}
_REFUSED = {reason: REQUESTS_REFUSED.labels(reason=reason) for reason in REFUSAL_REASONS}
_POLICY_LOADED, _POLICY_REFUSED = POLICY_RELOADS.labels(outcome="loaded"), POLICY_RELOADS.labels(outcome="refused")


def expose(collectors: Iterable[Collector]) -> None:
    """Put `collectors` into the default registry, which /metrics renders."""
    for collector in collectors:
        with contextlib.suppress(ValueError):  # already exposed (a second app or runner in the same process)
            REGISTRY.register(collector)


def expose_service_metrics() -> None:
    expose(SERVICE_METRICS)


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
