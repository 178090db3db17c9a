"""What generating variations produced: per item (accepted, filtered and why, attempts, error) and in total."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

log = logging.getLogger(__name__)

# The reasons the verifier (verifier.py) counts in VariationResult.filtered, besides hygiene's.
VERIFIER_REASONS = frozenset(
    {
        "copied_example",
        "injected_source",
        "not_first_person",
        "drifted",
        "judge_disagrees",
        "teacher_disagrees",
        "unverified",
    }
)


# --------------------------------------------------------------------------------------------- results and counts
@dataclass
class VariationResult:
    """What one labeled text got: accepted variations, what was filtered and why, and how the requests went."""

    text: str
    label: str
    accepted: list[str] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)
    # Why the item got nothing from the LLM: timeout, connection, http_503, garbage_output, endpoint_down, ...
    error: str | None = None
    error_detail: str | None = None
    attempt_errors: list[str] = field(default_factory=list)  # one reason per failed attempt, retried ones included
    attempts: int = 0
    rounds: int = 0  # requests that got an answer (asked again while fewer than its budget were accepted)
    seconds: float = 0.0
    completion_tokens: int = 0
    raw_output: str | None = None
    verified: int = 0  # rewrites that passed hygiene and went to the verifier (its rejections are in `filtered`)
    composed: int = 0  # of `accepted`, the new posts written from this text and others of its class (compose)

    @property
    def rejected(self) -> int:
        """Rewrites the verifier rejected, all reasons together."""
        return sum(n for reason, n in self.filtered.items() if reason in VERIFIER_REASONS)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "label": self.label,
            "accepted": self.accepted,
            "filtered": dict(self.filtered),
            "error": self.error,
            "error_detail": self.error_detail,
            "attempts": self.attempts,
            "rounds": self.rounds,
            "attempt_errors": self.attempt_errors,
            "seconds": round(self.seconds, 3),
            "completion_tokens": self.completion_tokens,
            "verified": self.verified,
            "rejected": self.rejected,
            "composed": self.composed,
        }


@dataclass
class VariationStats:
    """Running totals of one generator, per HTTP attempt. The Prometheus metrics (guardloop_llm_*, counted in
    `_count`) count per item instead: one request with its retries, failed when no usable answer came.

    Not locked: one generator belongs to one thread (readers only ever see slightly stale numbers).
    """

    requests: int = 0  # HTTP requests sent, retries included
    failures: Counter[str] = field(default_factory=Counter)  # failed attempts by reason
    retries: int = 0
    request_seconds: float = 0.0  # sum of request latencies
    completion_tokens: int = 0
    items: int = 0
    items_failed: int = 0
    accepted: int = 0
    filtered: Counter[str] = field(default_factory=Counter)  # by reason

    def since(self, before: VariationStats) -> VariationStats:
        """What was counted after `before` (a copy of these stats taken earlier)."""
        return VariationStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    @property
    def failures_total(self) -> int:
        return sum(self.failures.values())

    @property
    def filtered_total(self) -> int:
        return sum(self.filtered.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures_total,
            "failures_by_reason": dict(self.failures),
            "retries": self.retries,
            "request_seconds": round(self.request_seconds, 3),
            "completion_tokens": self.completion_tokens,
            "items": self.items,
            "items_failed": self.items_failed,
            "accepted": self.accepted,
            "filtered": self.filtered_total,
            "filtered_by_reason": dict(self.filtered),
        }


@dataclass
class VariationBatch:
    results: list[VariationResult]
    stats: VariationStats  # this batch only

    @property
    def failed(self) -> list[VariationResult]:
        return [result for result in self.results if result.failed]

    def labeled_variations(self) -> list[tuple[str, str]]:
        """(variation, label) pairs ready for a training set."""
        return [(variation, result.label) for result in self.results for variation in result.accepted]
