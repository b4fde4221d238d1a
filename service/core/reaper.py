"""No job stays stuck: RUNNING or CANCELLING jobs whose worker stopped heartbeating are
requeued (up to ``max_attempts``), failed, or cancelled. Safe to run from every API
replica at once: each decision is re-checked under the row lock.

A requeued job gets a new attempt number when a worker begins it; the attempt that was
given up on is fenced off by that number (`service.core.lifecycle.Fence`), so if its worker was only
paused and wakes up, it cannot overwrite the newer attempt. A requeue whose message the
broker refuses stays QUEUED without an outbox mark, and the relay sends it later."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from .db import Database
from .fairness import priority_of, send_validation_fairly
from .lifecycle import reap_verdict
from .models import Job, utcnow
from .records import UPLOAD_TABLES
from .settings import Settings
from .states import JobState, UploadState, lock_job, transition

log = logging.getLogger(__name__)


def reap_stale_jobs(db: Database, settings: Settings, send_job: Callable[[str, str], None]) -> dict[str, str]:
    """Handle every stale job; returns ``{job_id: new_state}``. ``send_job(job_id, queue)``
    sends a requeued job (the row is marked ``enqueued_at`` when it returns)."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    active = [JobState.RUNNING.value, JobState.CANCELLING.value]
    with db.read() as s:
        stale = list(s.scalars(select(Job.id).where(Job.state.in_(active), Job.heartbeat_at < cutoff)))
    done: dict[str, str] = {}
    for job_id in stale:
        with db.write() as s:
            job = lock_job(s, job_id)
            if job.state not in active or job.heartbeat_at is None or job.heartbeat_at >= cutoff:
                continue  # it moved on while we looked
            target, changes = reap_verdict(job, settings.max_attempts)
            transition(s, job_id, target, **changes)
            queue = job.queue
        log.warning("job %s: no heartbeat since before %s, now %s", job_id, cutoff.isoformat(), target.value)
        done[job_id] = target.value
        if target is JobState.QUEUED:
            try:
                send_job(job_id, queue)
            except Exception as exc:  # the relay sends it once the broker is back
                log.warning("job %s: requeued, but not sent (%s: %s)", job_id, type(exc).__name__, exc)
                continue
            with db.write() as s:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                    .values(enqueued_at=utcnow())
                )
    return done


def reap_stale_validations(db: Database, settings: Settings,
                           send_validation: Callable[[str, str], None]) -> list[str]:  # fmt: skip
    """Send again every validation whose worker stopped heartbeating (it died, or its process was
    killed); its next attempt is counted, and past ``max_validation_attempts`` the upload ends
    ``invalid`` (`service.core.uploads.begin_validation`). Returns the upload ids sent."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    sent: list[str] = []
    for kind, table in UPLOAD_TABLES.items():
        stale_now = (table.state == UploadState.VALIDATING.value, table.heartbeat_at < cutoff)
        with db.write() as s:
            ids = list(s.scalars(update(table).where(*stale_now).values(heartbeat_at=None, updated_at=utcnow())
                                 .returning(table.id)))  # fmt: skip
        for upload_id in ids:
            log.warning("%s %s: its validation stopped heartbeating; sending it again", kind, upload_id)
            try:
                send_validation(kind, upload_id)
            except Exception as exc:  # the relay sends it once the broker is back (no heartbeat now)
                log.warning("%s %s: not sent (%s: %s)", kind, upload_id, type(exc).__name__, exc)
                continue
            sent.append(upload_id)
    return sent


def reap(db: Database, settings: Settings, queues: Any) -> None:
    """One reaper pass: stale jobs (sent again at their fair priority), then stale validations."""
    reap_stale_jobs(db, settings, lambda job_id, queue: queues.send_job(job_id, queue, _priority(db, job_id)))
    reap_stale_validations(db, settings, lambda kind, upload_id: send_validation_fairly(db, queues, kind, upload_id))


def _priority(db: Database, job_id: str) -> int:
    with db.read() as s:
        return priority_of(s, job_id)
