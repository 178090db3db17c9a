"""Where the pool and the review queue live: SQLite (WAL file under the data directory) or PostgreSQL.

database = Database(url); upgrade_database(database)
PoolRepository(database)      pool batches, stats, export, purge, label requests (the trainer)
ReviewRepository(database)    queue, labels and their history, adjudication, final labels (the trainer)
ReviewerRepository(database)  reviewer tokens
"""

from guardloop.storage.db import (
    Database,
    DatabaseUnavailable,
    StorageError,
    safe_url,
    upgrade_database,
)
from guardloop.storage.pool import LabelRequest, PoolRecord, PoolRepository, PoolStats, StoredItem, WriteOutcome
from guardloop.storage.review import ReviewRepository
from guardloop.storage.review_records import (
    AlreadyAnswered,
    FinalLabel,
    InvalidAnswer,
    ItemComplete,
    ItemNotFound,
    LabelView,
    NothingToUndo,
    NotRequested,
    ReviewError,
    ReviewStats,
)
from guardloop.storage.reviewers import ReviewerError, ReviewerRepository, ReviewerView
from guardloop.storage.tables import NON_LABELS, RANDOM_SAMPLE, REVIEW_BAND, SKIP, UNCERTAIN, UNSURE

__all__ = [
    "NON_LABELS",
    "RANDOM_SAMPLE",
    "REVIEW_BAND",
    "SKIP",
    "UNCERTAIN",
    "UNSURE",
    "AlreadyAnswered",
    "Database",
    "DatabaseUnavailable",
    "FinalLabel",
    "InvalidAnswer",
    "ItemComplete",
    "ItemNotFound",
    "LabelRequest",
    "LabelView",
    "NotRequested",
    "NothingToUndo",
    "PoolRecord",
    "PoolRepository",
    "PoolStats",
    "ReviewError",
    "ReviewRepository",
    "ReviewStats",
    "ReviewerError",
    "ReviewerRepository",
    "ReviewerView",
    "StorageError",
    "StoredItem",
    "WriteOutcome",
    "safe_url",
    "upgrade_database",
]
