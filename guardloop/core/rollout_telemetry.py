"""The roll-out's Prometheus metrics (shadow and canary; names and meaning: k8s/METRICS.md), exported by the service.

Kept beside guardloop/core/telemetry.py, with the same rules: created unregistered, exposed by role (the service
calls `expose`), every known label value initialised so each series exists at 0 before its first event.
"""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from guardloop.core.labels import HARMFUL_LABELS, LABELS

SHADOW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SHADOW_TEXTS = Counter(
    "guardloop_shadow_texts_total",
    "live texts offered to the shadow model: scored, or dropped (queue full or the service busy)",
    ["outcome"],
    registry=None,
)
SHADOW_DISAGREEMENTS = Counter(
    "guardloop_shadow_disagreements_total",
    "shadow-scored texts where exactly one of the serving and the shadow model gives the label",
    ["label"],
    registry=None,
)
SHADOW_FLAGGED = Counter(
    "guardloop_shadow_flagged_total",
    "shadow-scored texts flagged in a category, by the serving or the shadow model",
    ["label", "model"],
    registry=None,
)
SHADOW_SECONDS = Histogram(
    "guardloop_shadow_seconds",
    "seconds the shadow model took per scored text (off the request path)",
    buckets=SHADOW_BUCKETS,
    registry=None,
)
CANARY_REQUESTS = Counter(
    "guardloop_canary_requests_total",
    "requests answered during a canary, by the model that answered and whether it failed",
    ["model", "outcome"],
    registry=None,
)
CANARY_SHARE = Gauge(
    "guardloop_canary_share",
    "share of traffic this replica routes to the canary (0: none)",
    registry=None,
    multiprocess_mode="livemax",
)
ROLLOUT_HALTS = Counter(
    "guardloop_rollout_halts_total",
    "canaries this replica stopped routing to because a replica found them out of bounds",
    registry=None,
)

_ALL = (
    SHADOW_TEXTS,
    SHADOW_DISAGREEMENTS,
    SHADOW_FLAGGED,
    SHADOW_SECONDS,
    CANARY_REQUESTS,
    CANARY_SHARE,
    ROLLOUT_HALTS,
)
SHADOW_SCORED = SHADOW_TEXTS.labels(outcome="scored")
SHADOW_DROPPED = SHADOW_TEXTS.labels(outcome="dropped")
for _label in LABELS:
    SHADOW_DISAGREEMENTS.labels(label=_label)
for _label in HARMFUL_LABELS:
    for _model in ("serving", "shadow"):
        SHADOW_FLAGGED.labels(label=_label, model=_model)
for _model in ("canary", "stable"):
    for _outcome in ("ok", "error"):
        CANARY_REQUESTS.labels(model=_model, outcome=_outcome)


def expose() -> None:
    for collector in _ALL:
        with contextlib.suppress(ValueError):  # already exposed (a second app in the same process)
            REGISTRY.register(collector)
