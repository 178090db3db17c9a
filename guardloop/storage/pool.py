"""The pool of uncertain (and a sample of confident) traffic: batched upserts by text hash, stats, export,
retention purge, and the trainer's label requests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, not_, or_, select, update

from guardloop.core.labels import LABELS
from guardloop.storage.db import Database
from guardloop.storage.tables import RANDOM_SAMPLE, UNCERTAIN, Label, PoolItem
from guardloop.storage.texts import redact, text_hash


@dataclass(frozen=True)
class PoolRecord:
    """One /classify result chosen for the pool, as the request path hands it to the writer."""

    text: str
    label: str
    scores: dict[str, float]
    uncertainty: float
    margin: float
    model_version: str
    sampled_by: str  # UNCERTAIN, RANDOM_SAMPLE or REVIEW_BAND
    client_id: str | None
    seen_at: datetime
    tenant: str | None = None  # the policy that decided (service/decisions.py)
    # Set for a text in its tenant's review band: it is requested for review at once, with this reason and priority.
    review_reason: dict[str, Any] | None = None
    priority: float = 0.0


@dataclass(frozen=True)
class WriteOutcome:
    new_items: int  # rows created
    repeats: int  # records that raised the seen_count of a row instead


@dataclass(frozen=True)
class StoredItem:
    id: int
    text: str
    text_hash: str
    seen_count: int
    label: str
    scores: dict[str, float]
    uncertainty: float
    margin: float
    model_version: str
    sampled_by: str
    client_id: str | None
    tenant: str | None
    first_seen: datetime
    last_seen: datetime
    requested_at: datetime | None
    request_reason: dict[str, Any] | None
    priority: float
    suspected_at: datetime | None = None  # its settled label was doubted (storage/suspects.py): a second look

    @classmethod
    def of(cls, row: PoolItem) -> StoredItem:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("first_seen", "last_seen", "requested_at", "suspected_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass(frozen=True)
class LabelRequest:
    """The trainer asks people to label `item_id`; `reason` says why (strategy, cluster, uncertainty, cycle_id)."""

    item_id: int
    reason: dict[str, Any]
    priority: float = 0.0


@dataclass
class PoolStats:
    items: int = 0
    seen_total: int = 0
    uncertain_items: int = 0
    sampled_items: int = 0
    requested_items: int = 0
    labeled_items: int = 0
    oldest_first_seen: datetime | None = None
    newest_last_seen: datetime | None = None
    by_label: dict[str, int] = field(default_factory=dict)
    by_model_version: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("oldest_first_seen", "newest_last_seen"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def _upsert_statement(dialect: str) -> Any:
    """INSERT a new text, or add its sightings to the row of the same hash (one statement for both databases:
    they spell ON CONFLICT ... DO UPDATE alike; only the import differs)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(PoolItem)
    new = statement.excluded
    unrequested = PoolItem.requested_at.is_(None)
    return statement.on_conflict_do_update(
        index_elements=[PoolItem.text_hash],
        set_={
            "seen_count": PoolItem.seen_count + new.seen_count,
            "last_seen": case((new.last_seen > PoolItem.last_seen, new.last_seen), else_=PoolItem.last_seen),
            # The newest model's view of the text replaces the older one.
            "label": new.label,
            "scores": new.scores,
            "uncertainty": new.uncertainty,
            "margin": new.margin,
            "model_version": new.model_version,
            "sampled_by": new.sampled_by,
            # A review-band sighting requests a row nobody requested yet (and names its tenant); a requested row keeps
            # its request, whoever sees the text next.
            "requested_at": func.coalesce(PoolItem.requested_at, new.requested_at),
            "request_reason": case((unrequested, new.request_reason), else_=PoolItem.request_reason),
            "priority": case((unrequested, new.priority), else_=PoolItem.priority),
            "tenant": case(
                (and_(unrequested, new.requested_at.is_not(None)), new.tenant),
                else_=func.coalesce(PoolItem.tenant, new.tenant),
            ),
        },
    )


def _live_label_exists() -> Any:
    return exists().where(Label.item_id == PoolItem.id, Label.active.is_(True), Label.label.in_(LABELS))


class PoolRepository:
    def __init__(self, database: Database, *, redact_contacts: bool = False) -> None:
        self.database = database
        self.redact_contacts = redact_contacts
        self._upsert = _upsert_statement(database.dialect)

    # ------------------------------------------------------------------ writing
    def write_batch(self, records: Sequence[PoolRecord]) -> WriteOutcome:
        """Insert new texts, raise seen_count of known ones; one transaction, all or nothing."""
        if not records:
            return WriteOutcome(0, 0)
        rows: dict[str, dict[str, Any]] = {}
        for record in records:
            # PostgreSQL text cannot hold NUL; one such request must not wedge the writer on a batch it cannot store.
            text = record.text.replace("\x00", "\ufffd")
            text = redact(text) if self.redact_contacts else text
            key = text_hash(text)
            row = rows.get(key)
            if row is None:
                rows[key] = {
                    "text": text,
                    "text_hash": key,
                    "seen_count": 1,
                    "label": record.label,
                    "scores": record.scores,
                    "uncertainty": record.uncertainty,
                    "margin": record.margin,
                    "model_version": record.model_version,
                    "sampled_by": record.sampled_by,
                    "client_id": record.client_id,
                    "tenant": record.tenant,
                    "first_seen": record.seen_at,
                    "last_seen": record.seen_at,
                    "requested_at": record.seen_at if record.review_reason else None,
                    "request_reason": record.review_reason,
                    "priority": record.priority,
                }
            else:  # the same text twice in one batch: one row (PostgreSQL refuses to upsert a row twice per statement)
                row["seen_count"] += 1
                row["last_seen"] = max(row["last_seen"], record.seen_at)
                if record.review_reason and row["requested_at"] is None:
                    row.update(
                        requested_at=record.seen_at,
                        request_reason=record.review_reason,
                        priority=record.priority,
                        tenant=record.tenant,
                    )
        ordered = [rows[key] for key in sorted(rows)]  # a fixed lock order: concurrent replicas cannot deadlock
        with self.database.write() as session:
            known = set(session.scalars(select(PoolItem.text_hash).where(PoolItem.text_hash.in_(list(rows)))))
            # executemany of one compiled statement: the writer thread spends little time holding the GIL
            session.connection().execute(self._upsert, ordered)
        new_items = len(rows) - len(known)
        return WriteOutcome(new_items=new_items, repeats=len(records) - new_items)

    # ------------------------------------------------------------------ reading
    def get(self, item_id: int) -> StoredItem | None:
        with self.database.read() as session:
            row = session.get(PoolItem, item_id)
            return StoredItem.of(row) if row else None

    def count(self) -> int:
        with self.database.read() as session:
            return session.scalar(select(func.count()).select_from(PoolItem)) or 0

    def iter_items(
        self,
        *,
        unrequested_only: bool = False,
        requested_only: bool = False,
        since: datetime | None = None,
        min_uncertainty: float | None = None,
        chunk: int = 1000,
    ) -> Iterator[StoredItem]:
        """Items in id order, read in chunks (the whole pool never sits in memory)."""
        conditions = []
        if unrequested_only:
            conditions.append(PoolItem.requested_at.is_(None))
        if requested_only:
            conditions.append(PoolItem.requested_at.is_not(None))
        if since is not None:
            conditions.append(PoolItem.last_seen >= since)
        if min_uncertainty is not None:
            conditions.append(PoolItem.uncertainty >= min_uncertainty)
        last_id = 0
        while True:
            with self.database.read() as session:
                rows = session.scalars(
                    select(PoolItem).where(PoolItem.id > last_id, *conditions).order_by(PoolItem.id).limit(chunk)
                ).all()
                items = [StoredItem.of(row) for row in rows]
            if not items:
                return
            yield from items
            last_id = items[-1].id

    def stats(self) -> PoolStats:
        with self.database.read() as session:
            totals = session.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(PoolItem.seen_count), 0),
                    func.count().filter(PoolItem.sampled_by == UNCERTAIN),
                    func.count().filter(PoolItem.sampled_by == RANDOM_SAMPLE),
                    func.count().filter(PoolItem.requested_at.is_not(None)),
                    func.min(PoolItem.first_seen),
                    func.max(PoolItem.last_seen),
                )
            ).one()
            labeled = session.scalar(select(func.count()).select_from(PoolItem).where(_live_label_exists())) or 0
            by_label = dict(session.execute(select(PoolItem.label, func.count()).group_by(PoolItem.label)).all())
            by_version = dict(
                session.execute(select(PoolItem.model_version, func.count()).group_by(PoolItem.model_version)).all()
            )
        oldest, newest = totals[5], totals[6]
        return PoolStats(
            items=totals[0],
            seen_total=int(totals[1]),
            uncertain_items=totals[2],
            sampled_items=totals[3],
            requested_items=totals[4],
            labeled_items=labeled,
            # min/max bypass the column type on SQLite and come back as text
            oldest_first_seen=_as_time(oldest),
            newest_last_seen=_as_time(newest),
            by_label=by_label,
            by_model_version=by_version,
        )

    def duplicate_hashes(self) -> int:
        """Hashes held by more than one row (the unique constraint keeps this 0; the benchmark checks it)."""
        with self.database.read() as session:
            grouped = select(PoolItem.text_hash).group_by(PoolItem.text_hash).having(func.count() > 1).subquery()
            return session.scalar(select(func.count()).select_from(grouped)) or 0

    def export(self, *, requested_only: bool = False) -> Iterator[dict[str, Any]]:
        for item in self.iter_items(requested_only=requested_only):
            yield item.as_json()

    # ------------------------------------------------------------------ retention
    def purge(self, *, older_than: datetime, include_labeled: bool = False) -> int:
        """Delete items last seen (and last requested) before `older_than`.

        Items a person labeled are the training set and stay unless `include_labeled`; their labels go with them.
        """
        conditions = [
            PoolItem.last_seen < older_than,
            or_(PoolItem.requested_at.is_(None), PoolItem.requested_at < older_than),
        ]
        if not include_labeled:
            conditions.append(not_(exists().where(Label.item_id == PoolItem.id, Label.active.is_(True))))
        with self.database.write() as session:
            result = session.execute(delete(PoolItem).where(and_(*conditions)))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------ label requests (the trainer)
    def mark_requested(self, requests: Iterable[LabelRequest], *, at: datetime) -> list[int]:
        """Put items into the reviewers' queue with their reason and priority; returns the ids not found."""
        missing: list[int] = []
        with self.database.write() as session:
            for request in requests:
                result = session.execute(
                    update(PoolItem)
                    .where(PoolItem.id == request.item_id)
                    .values(requested_at=at, request_reason=request.reason, priority=request.priority)
                )
                if not result.rowcount:
                    missing.append(request.item_id)
        return missing

    def withdraw_requests(self, item_ids: Iterable[int]) -> int:
        """Take items nobody has answered yet out of the queue (a newer cycle chose others)."""
        ids = list(item_ids)
        if not ids:
            return 0
        with self.database.write() as session:
            result = session.execute(
                update(PoolItem)
                .where(
                    PoolItem.id.in_(ids),
                    not_(exists().where(Label.item_id == PoolItem.id, Label.active.is_(True))),
                )
                .values(requested_at=None, request_reason=None, priority=0.0)
            )
            return int(result.rowcount or 0)


def _as_time(value: Any) -> datetime | None:
    from datetime import UTC

    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
