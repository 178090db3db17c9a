"""suspected mislabels: a settled label the label check doubts goes back for a second reviewer

Revision ID: 0004_suspected_labels
Revises: 0003_rollout
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_suspected_labels"
down_revision = "0003_rollout"
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Nullable columns: SQLite adds them in place, no table rebuild.
    op.add_column("pool_items", sa.Column("suspected_at", Time, nullable=True))
    op.add_column("pool_items", sa.Column("suspicion", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pool_items") as batch:
        batch.drop_column("suspicion")
        batch.drop_column("suspected_at")
