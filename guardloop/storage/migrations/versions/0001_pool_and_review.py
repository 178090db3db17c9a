"""pool items, labels, reviewers

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pool_items",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_hash", sa.String(length=64), nullable=False),
        sa.Column("seen_count", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("uncertainty", sa.Float(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("sampled_by", sa.String(length=16), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("first_seen", Time, nullable=False),
        sa.Column("last_seen", Time, nullable=False),
        sa.Column("requested_at", Time, nullable=True),
        sa.Column("request_reason", sa.JSON(), nullable=True),
        sa.Column("priority", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("text_hash"),
    )
    op.create_index("ix_pool_items_last_seen", "pool_items", ["last_seen"])
    op.create_index("ix_pool_items_queue", "pool_items", ["requested_at", "priority"])

    op.create_table(
        "reviewers",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("revoked_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_hash"),
    )

    op.create_table(
        "labels",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("item_id", BigId, nullable=False),
        sa.Column("reviewer", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("superseded_by", BigId, nullable=True),
        sa.Column("retracted_at", Time, nullable=True),
        sa.ForeignKeyConstraint(["item_id"], ["pool_items.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["superseded_by"], ["labels.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_labels_item_id", "labels", ["item_id"])
    op.create_index("ix_labels_reviewer", "labels", ["reviewer"])
    op.create_index(
        "uq_labels_live_answer",
        "labels",
        ["item_id", "reviewer", "kind"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("reviewers")
    op.drop_table("pool_items")
