"""Pool items requested for review, as a cycle leaves them: what the review, agreement, suspect and fuzz tests
start from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from guardloop.core.labels import LABELS
from guardloop.storage import UNCERTAIN, Database, LabelRequest, PoolRecord, PoolRepository


def uncertain_record(text: str, seen_at: datetime) -> PoolRecord:
    """A text the served model was unsure about (medical-advice at 0.5), logged for client "bot"."""
    return PoolRecord(
        text=text,
        label="medical-advice",
        scores=dict.fromkeys(LABELS, 0.1) | {"medical-advice": 0.5},
        uncertainty=0.9,
        margin=0.4,
        model_version="v1",
        sampled_by=UNCERTAIN,
        client_id="bot",
        seen_at=seen_at,
    )


def seed_requested(database: Database, texts: Sequence[str], reason: dict[str, Any] | None = None) -> list[int]:
    """Log `texts` and request each for review (priority 0.5, `reason`); their ids in order."""
    pool = PoolRepository(database)
    now = datetime.now(UTC)
    pool.write_batch([uncertain_record(text, now) for text in texts])
    ids = sorted(item.id for item in pool.iter_items())
    pool.mark_requested([LabelRequest(item_id, reason or {"strategy": "test"}, 0.5) for item_id in ids], at=now)
    return ids
