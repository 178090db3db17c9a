"""Reviewer accounts: a name and the hash of a random token. The token itself is shown once and never stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from guardloop.storage.db import Database, StorageError
from guardloop.storage.tables import Reviewer, utcnow

TOKEN_PREFIX = "glr_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class ReviewerError(StorageError):
    pass


@dataclass(frozen=True)
class ReviewerView:
    name: str
    created_at: datetime
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ReviewerError(
            f"reviewer name {name!r} is not allowed: 1-64 letters, digits or . _ @ -, starting with a letter or digit"
        )
    return name


class ReviewerRepository:
    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, name: str) -> str:
        """Create a reviewer and return their token (the only time it exists in clear)."""
        check_name(name)
        token = new_token()
        try:
            with self.database.write() as session:
                session.add(Reviewer(name=name, token_hash=hash_token(token), created_at=utcnow()))
        except IntegrityError:
            raise ReviewerError(
                f"reviewer {name!r} exists; `guardloop reviewers rotate {name}` gives them a new token"
            ) from None
        return token

    def rotate(self, name: str) -> str:
        """A new token for an existing reviewer (also re-enables a revoked one); the old token stops working."""
        token = new_token()
        with self.database.write() as session:
            reviewer = session.scalars(select(Reviewer).where(Reviewer.name == name)).first()
            if reviewer is None:
                raise ReviewerError(f"no reviewer {name!r}; add them with `guardloop reviewers add {name}`")
            reviewer.token_hash = hash_token(token)
            reviewer.revoked_at = None
        return token

    def revoke(self, name: str) -> None:
        with self.database.write() as session:
            reviewer = session.scalars(select(Reviewer).where(Reviewer.name == name)).first()
            if reviewer is None:
                raise ReviewerError(f"no reviewer {name!r}")
            reviewer.revoked_at = reviewer.revoked_at or utcnow()

    def list(self) -> list[ReviewerView]:
        with self.database.read() as session:
            rows = session.scalars(select(Reviewer).order_by(Reviewer.name)).all()
            return [ReviewerView(row.name, row.created_at, row.revoked_at) for row in rows]

    def authenticate(self, token: str) -> str | None:
        """The name of the live reviewer holding `token`, or None."""
        presented = hash_token(token)
        with self.database.read() as session:
            row = session.scalars(select(Reviewer).where(Reviewer.token_hash == presented)).first()
            if row is None or row.revoked_at is not None:
                return None
            # The lookup found the row by hash; compare again in constant time so no branch depends on the bytes.
            return row.name if hmac.compare_digest(row.token_hash, presented) else None
