"""roll-out tallies (what each replica saw its shadow or canary do) and halts (a canary stopped by its bounds)

Revision ID: 0003_rollout
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_rollout"
down_revision = "0002"
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollout_tallies",
        sa.Column("candidate", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("replica", sa.String(length=64), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("candidate", "stage", "replica"),
    )
    op.create_table(
        "rollout_halts",
        sa.Column("candidate", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("replica", sa.String(length=64), nullable=False),
        sa.Column("at", Time, nullable=False),
        sa.PrimaryKeyConstraint("candidate", "stage"),
    )


def downgrade() -> None:
    op.drop_table("rollout_halts")
    op.drop_table("rollout_tallies")
