"""SQLAlchemy tables: team, API key, model, dataset, job, job_event, artifact, idempotency key,
webhook delivery.

Every row records its owning team. Jobs
refer to their uploads by id without a foreign key: a job keeps the record of what it
was run with even after an upload is deleted.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")
TagsType = ARRAY(String(64)).with_variant(JSON(), "sqlite")
"""Tags: a PostgreSQL text array (filters use ``@>``); JSON in an old SQLite file being imported."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A random, URL-safe id such as ``job_3f9a…`` (the job id doubles as the Celery task id)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes (naive values read back, as from an old SQLite file, are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_submissions_per_minute: Mapped[int | None] = mapped_column(Integer)
    job_time_budget_s: Mapped[float | None] = mapped_column(Float)
    """Quota overrides; None means the settings' default."""
    webhook_secret_version: Mapped[int | None] = mapped_column(Integer)
    """The team's webhook signing secret is derived from the operator's key and this number
    (`service.core.webhooks`); None until the team makes one, bumped by each rotation."""
    webhook_secret_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKey(Base):
    """A team's API key: only its sha256 is stored, found by its public ``prefix``."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16), default="team")
    """``team`` (its own team's resources) or ``admin`` (every team's)."""
    label: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class _Upload:
    """Columns shared by uploaded models and datasets."""

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"))
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="validating")
    """``validating`` → ``ready`` | ``invalid`` (`service.core.states.UploadState`)."""
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Validations begun (`service.core.uploads`)."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Set while a validation runs; a stale one is sent again by the reaper."""
    tags: Mapped[list[str]] = mapped_column(TagsType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ModelUpload(_Upload, Base):
    __tablename__ = "models"
    __table_args__ = (
        Index("ix_models_team_created", "team_id", "created_at", "id"),
        Index("ix_models_tags", "tags", postgresql_using="gin"),
    )


class DatasetUpload(_Upload, Base):
    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_team_created", "team_id", "created_at", "id"),
        Index("ix_datasets_tags", "tags", postgresql_using="gin"),
    )

    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    """How to read the file: the ``DataSpec`` fields given at upload."""


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        Index("ix_jobs_state_enqueued", "state", "enqueued_at"),
        Index("ix_jobs_team_name", "team_id", "name"),
        Index("ix_jobs_tags", "tags", postgresql_using="gin"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"))
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    """The ``CompressSpec`` as submitted (JSON mode)."""
    teacher_model_id: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40), index=True)
    eval_dataset_id: Mapped[str | None] = mapped_column(String(40), index=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    """The headline numbers (``metrics["summary"]``), small enough for every job read."""
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType, deferred=True)
    """The whole report.json; loaded only when asked for."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    run_seconds: Mapped[float | None] = mapped_column(Float)
    """Wall time of the last attempt, from RUNNING to the terminal state."""
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Set when a finished job was deleted: its artifacts are gone, the row stays for the record."""
    name: Mapped[str | None] = mapped_column(String(255))
    tags: Mapped[list[str]] = mapped_column(TagsType, default=list)
    notify: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    """``{"url": …}``: where the job document is sent when the job ends (`WebhookDelivery`)."""
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When the broker last accepted this job's message (the outbox mark): a QUEUED row
    with none, or whose message the broker no longer holds, is sent again by the relay."""


class JobEvent(Base):
    """A progress report, a log line or a state change; the id is the SSE event id."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    """``progress`` | ``log`` | ``state``."""
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """A job's end announced to its ``notify`` URL: made in the transaction of the final state
    change, sent (and retried) by the API's delivery loop (`service.core.webhooks`)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(String(64), ForeignKey("teams.id"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(32))
    """The job state that made it: ``SUCCEEDED``, ``FAILED`` or ``CANCELLED``."""
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """``pending`` (another attempt is due at ``next_attempt_at``), ``delivered`` or ``failed``."""
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    """One entry per attempt: at, status (HTTP status or null), error, duration_ms."""
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
