"""The job outbox: a job is committed QUEUED first and sent to the broker after, so neither a
crash between the two nor a broker outage can lose it.

`enqueue` sends a job's message and marks the row (``enqueued_at``) once the broker took it.
`relay_queued_jobs` (a loop in every API process, see `service.api.app`) sends again every
QUEUED job whose message is missing for longer than ``relay_grace_s``:

* never accepted: no mark (the API died after the commit, the broker was away, the reaper
  requeued it while the broker was away);
* no longer held: the broker lost it (Redis restarted without persistence) or a worker died
  holding it unacknowledged (`service.core.queues.Queues.held_messages`).

Uploads still ``validating`` whose validation has not begun (no heartbeat) and whose message is
missing are sent again the same way; one whose worker died mid-validation is the reaper's.

Sending twice is harmless: a worker runs a job only if it moves the row from QUEUED to RUNNING
under the row lock (`service.core.lifecycle.begin`); a second delivery finds it RUNNING (or finished)
and is dropped, and validation likewise only acts on an upload still ``validating``. So
several API replicas may relay at once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from .db import Database
from .dberrors import database_unavailable
from .fairness import priority_of, send_validation_fairly
from .models import DatasetUpload, Job, JobEvent, ModelUpload, utcnow
from .queues import BrokerUnavailable, Queues
from .settings import Settings
from .states import JobState, UploadState

log = logging.getLogger(__name__)
BATCH = 500
"""Most rows looked at per pass (the oldest first)."""


def enqueue(db: Database, queues: Queues, job_id: str, queue: str) -> bool:
    """Send the job's message, at its team's fair priority (`service.core.fairness`), then mark the
    row; False when the broker refused (the row stays unmarked, and the relay sends it later). A
    failed mark is only logged: the relay then sends the job once more, which is harmless."""
    try:
        with db.read() as s:
            priority = priority_of(s, job_id)
        queues.send_job(job_id, queue, priority)
    except BrokerUnavailable as exc:
        log.warning("job %s: the broker is unavailable (%s); the relay will send it later", job_id, exc)
        return False
    try:
        with db.write() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                .values(enqueued_at=utcnow())
            )
    except Exception as exc:
        if not database_unavailable(exc):
            raise
        log.warning("job %s: sent, but its outbox mark was not written (%s)", job_id, exc)
    return True


def relay_queued_jobs(db: Database, settings: Settings, queues: Queues) -> list[str]:
    """One relay pass; returns the ids of the jobs and uploads sent again."""
    cutoff = utcnow() - timedelta(seconds=settings.relay_grace_s)
    queued = JobState.QUEUED.value
    with db.read() as s:
        jobs = s.execute(
            select(Job.id, Job.queue, Job.enqueued_at)
            .where(
                Job.state == queued,
                or_(
                    and_(Job.enqueued_at.is_(None), Job.updated_at < cutoff),
                    Job.enqueued_at < cutoff,
                ),
            )
            .order_by(Job.created_at)
            .limit(BATCH)
        ).all()
        uploads = [
            (kind, ident)
            for kind, table in (("model", ModelUpload), ("dataset", DatasetUpload))
            for ident in s.scalars(
                select(table.id)
                .where(table.state == UploadState.VALIDATING.value, table.heartbeat_at.is_(None),
                       table.updated_at < cutoff)
                .order_by(table.created_at)
                .limit(BATCH)
            )
        ]
    marked = [j.id for j in jobs if j.enqueued_at is not None]
    lost_jobs: set[str] = set()
    lost_uploads: list[tuple[str, str]] = []
    if marked or uploads:
        # a job is QUEUED until a worker begins it, and a validation has no heartbeat until then,
        # moments after delivery: a delivery older than the grace period went to a worker that died
        within = {j: settings.relay_grace_s for j in marked}
        within |= {f"validate-{i}": settings.relay_grace_s for _, i in uploads}
        missing = _missing(queues, within)
        lost_jobs = {j for j in marked if j in missing}
        lost_uploads = [(kind, ident) for kind, ident in uploads if f"validate-{ident}" in missing]

    sent: list[str] = []
    for job in jobs:
        if job.enqueued_at is not None and job.id not in lost_jobs:
            continue
        reason = (
            "the broker never accepted its message"
            if job.enqueued_at is None
            else "the broker no longer holds its message"
        )
        if not _still_waiting(db, job.id, job.enqueued_at):
            continue
        if not enqueue(db, queues, job.id, job.queue):
            return sent  # the broker is away: the next pass tries again
        _note(db, job.id, f"sent to the queue again: {reason}")
        log.warning("relay: job %s sent again (%s)", job.id, reason)
        sent.append(job.id)
    for kind, ident in lost_uploads:
        try:
            send_validation_fairly(db, queues, kind, ident)
        except BrokerUnavailable:
            continue
        with db.write() as s:  # the next pass waits another grace period before looking again
            table = ModelUpload if kind == "model" else DatasetUpload
            still = and_(table.id == ident, table.state == UploadState.VALIDATING.value)
            s.execute(update(table).where(still).values(updated_at=utcnow()))
        log.warning("relay: validation of %s %s sent again", kind, ident)
        sent.append(ident)
    return sent


def _missing(queues: Queues, within: dict[str, float]) -> set[str]:
    """The task ids (with how recent a delivery still counts) the broker does not hold, looked
    at twice: a message a worker is taking at the moment of the first look shows in the second."""
    missing = set(within)
    for _ in range(2):
        try:
            held = queues.held_messages()
        except Exception as exc:  # the broker is away: nothing can be sent now anyway
            log.warning("relay: cannot inspect the broker (%s: %s)", type(exc).__name__, exc)
            return set()
        missing = {t for t in missing if not held.holds(t, delivered_within=within[t])}
        if not missing:
            break
    return missing


def _still_waiting(db: Database, job_id: str, enqueued_at: object) -> bool:
    """The row is still QUEUED with the mark we saw (no other relay or worker moved it since)."""
    with db.read() as s:
        row = s.execute(select(Job.state, Job.enqueued_at).where(Job.id == job_id)).one_or_none()
    return row is not None and row.state == JobState.QUEUED.value and row.enqueued_at == enqueued_at


def _note(db: Database, job_id: str, message: str) -> None:
    """A log event on the job, so whoever follows it sees why it waited."""
    with db.write() as s:
        data = {"stage": None, "message": message}
        s.add(JobEvent(job_id=job_id, kind="log", data=data, created_at=utcnow()))
