"""Limits: uploads' validation attempts and heartbeat, a team's job time budget, job tombstones.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    for table in ("models", "datasets"):
        op.add_column(table, sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        op.add_column(table, sa.Column("heartbeat_at", TS, nullable=True))
    op.add_column("teams", sa.Column("job_time_budget_s", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("deleted_at", TS, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "deleted_at")
    op.drop_column("teams", "job_time_budget_s")
    for table in ("models", "datasets"):
        op.drop_column(table, "heartbeat_at")
        op.drop_column(table, "attempts")
