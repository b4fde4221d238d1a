"""API keys per team, per-team quota overrides, the job outbox mark.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(64), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("label", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
    )
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"], unique=True)
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("max_running_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("max_submissions_per_minute", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", TS, nullable=True))
    op.create_index("ix_jobs_state_enqueued", "jobs", ["state", "enqueued_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_enqueued", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
    with op.batch_alter_table("teams") as batch:
        for column in ("max_submissions_per_minute", "max_stored_bytes", "max_running_jobs"):
            batch.drop_column(column)
    op.drop_table("api_keys")
