"""pool items name the tenant policy that decided on them (review-band texts are requested for review at once)

Revision ID: 0005_pool_tenant
Revises: 0004_suspected_labels
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_pool_tenant"
down_revision = "0004_suspected_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: SQLite adds it in place, no table rebuild; rows pooled before tenants existed keep NULL.
    op.add_column("pool_items", sa.Column("tenant", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pool_items") as batch:
        batch.drop_column("tenant")
