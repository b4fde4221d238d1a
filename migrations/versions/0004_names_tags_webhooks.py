"""Names and tags on jobs and uploads, a job's notify URL, webhook deliveries, team webhook secrets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
TAGS = ARRAY(sa.String(64))


def upgrade() -> None:
    for table in ("models", "datasets", "jobs"):
        op.add_column(table, sa.Column("tags", TAGS, nullable=False, server_default="{}"))
        # tag filters (`tags @> ARRAY[…]`) use a GIN index
        op.create_index(f"ix_{table}_tags", table, ["tags"], postgresql_using="gin")
    op.add_column("jobs", sa.Column("name", sa.String(255), nullable=True))
    op.add_column("jobs", sa.Column("notify", JSONB(), nullable=True))
    op.create_index("ix_jobs_team_name", "jobs", ["team_id", "name"])
    op.add_column("teams", sa.Column("webhook_secret_version", sa.Integer(), nullable=True))
    op.add_column("teams", sa.Column("webhook_secret_rotated_at", TS, nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team_id", sa.String(64), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", JSONB(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_column("teams", "webhook_secret_rotated_at")
    op.drop_column("teams", "webhook_secret_version")
    op.drop_index("ix_jobs_team_name", "jobs")
    op.drop_column("jobs", "notify")
    op.drop_column("jobs", "name")
    for table in ("models", "datasets", "jobs"):
        op.drop_index(f"ix_{table}_tags", table)
        op.drop_column(table, "tags")
