"""The state machines of jobs and uploads. Every job state change goes through `transition`
(the rules for which target a caller picks are in `service.core.lifecycle`), every upload's
through `service.core.uploads`.

Jobs:

QUEUED ──▶ RUNNING ──▶ SUCCEEDED | FAILED
  │           │  ▲
  │           │  └── (requeued by the reaper after a lost worker, or handed back by a worker
  │           │       that lost its database; each RUNNING is a new attempt, ``attempts + 1``)
  │           ▼
  │       CANCELLING ──▶ CANCELLED | FAILED
  └──▶ CANCELLED | FAILED

Uploads (models and datasets): ``validating ──▶ ready | invalid``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Job, JobEvent, utcnow
from .webhooks import queue_delivery


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING, JobState.QUEUED}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED}),
}


class JobNotFound(LookupError):
    pass


class IllegalTransition(Exception):
    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        super().__init__(f"job {job_id} is {current}; it cannot become {target}")
        self.current = current
        self.target = target


def lock_job(session: Session, job_id: str) -> Job:
    """The job row, locked until the end of the transaction (``FOR UPDATE``)."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def transition(session: Session, job_id: str, target: JobState, **changes: Any) -> Job:
    """Lock the job, check ``current → target`` against the table, apply it with
    ``changes`` (column values) and record a ``state`` event. Raises `IllegalTransition`."""
    job = lock_job(session, job_id)
    current = JobState(job.state)
    if target not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(job_id, current, target)
    now = utcnow()
    job.state = target
    if target is JobState.RUNNING:
        job.started_at = job.heartbeat_at = now
        job.attempts += 1
    elif target is JobState.QUEUED:  # requeued: its message is sent again (the outbox mark is cleared)
        job.stage, job.progress_step, job.progress_total, job.eta_s, job.worker = None, 0, 0, None, None
        job.enqueued_at = None
    if target in TERMINAL:
        job.finished_at = now
        job.eta_s = None
        if job.started_at is not None:
            job.run_seconds = (now - job.started_at).total_seconds()
    for name, value in changes.items():
        setattr(job, name, value)
    data: dict[str, Any] = {"state": target.value, "previous": current.value}
    if job.error is not None and target is JobState.FAILED:
        data["error"] = job.error
    session.add(JobEvent(job_id=job_id, kind="state", data=data, created_at=now))
    if target in TERMINAL:
        queue_delivery(session, job)  # the job's webhook, if it has one (service.core.webhooks)
    return job


class UploadState(StrEnum):
    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


UPLOAD_TRANSITIONS: dict[UploadState, frozenset[UploadState]] = {
    UploadState.VALIDATING: frozenset({UploadState.READY, UploadState.INVALID}),
}
