"""Fair sharing of the workers between teams: a job's priority is its rank among its team's
unfinished jobs (how many of them were submitted before it), 0 to 9, and workers take the lowest
first (the broker keeps one list per priority, `service.core.queues`).

So when team A has forty jobs waiting (ranks 0, 1, 2, … 9, 9, 9) and team B submits one (rank 0),
B's job is the next a worker takes, after at most the job each worker is running: one job-slot
turnover. Round robin follows: B's second job (rank 1) goes before A's third. A team under the
default quota (4 unfinished) never ranks past 3, so it is never stuck behind another team's
backlog. A requeued job is ranked again when it is sent, among the team's jobs unfinished then.

Validations share the light queue the same way: an upload's rank among its team's uploads still
validating (`validation_priority_of`), so one team's batch of slow uploads does not hold another
team's small one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import Database
from .models import Job
from .records import UPLOAD_TABLES
from .states import JobState

STEPS = tuple(range(10))
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.CANCELLING.value)


def priority_of(session: Session, job_id: str) -> int:
    """The broker priority for sending ``job_id`` now: by how many of its team's unfinished jobs
    were submitted before it."""
    job = session.execute(select(Job.team_id, Job.created_at).where(Job.id == job_id)).one_or_none()
    if job is None:
        return STEPS[0]
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.team_id == job.team_id, Job.state.in_(UNFINISHED), Job.id != job_id,
            (Job.created_at < job.created_at) | ((Job.created_at == job.created_at) & (Job.id < job_id)))
    ) or 0  # fmt: skip
    return STEPS[min(int(ahead), len(STEPS) - 1)]


def validation_priority_of(session: Session, kind: str, upload_id: str) -> int:
    """The broker priority for validating ``upload_id`` now: by how many of its team's uploads
    (models and datasets) still validating were received before it."""
    table = UPLOAD_TABLES[kind]
    row = session.execute(select(table.team_id, table.created_at).where(table.id == upload_id)).one_or_none()
    if row is None:
        return STEPS[0]
    ahead = 0
    for other in UPLOAD_TABLES.values():
        ahead += session.scalar(
            select(func.count()).select_from(other).where(
                other.team_id == row.team_id, other.state == "validating", other.id != upload_id,
                other.created_at < row.created_at)
        ) or 0  # fmt: skip
    return STEPS[min(ahead, len(STEPS) - 1)]


def send_validation_fairly(db: Database, queues: Any, kind: str, upload_id: str) -> None:
    """Queue a validation at its priority now (``queues``: `service.core.queues.Queues`)."""
    with db.read() as s:
        priority = validation_priority_of(s, kind, upload_id)
    queues.send_validation(kind, upload_id, priority)
