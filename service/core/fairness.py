"""Fair sharing of the workers between teams: a job's priority is its rank among its team's
unfinished jobs (how many of them were submitted before it), 0 to 9, and workers take the lowest
first (the broker keeps one list per priority, `service.core.queues`).

So when team A has forty jobs waiting (ranks 0, 1, 2, … 9, 9, 9) and team B submits one (rank 0),
B's job is the next a worker takes, after at most the job each worker is running: one job-slot
turnover. Round robin follows: B's second job (rank 1) goes before A's third. A team under the
default quota (4 unfinished) never ranks past 3, so it is never stuck behind another team's
backlog. A requeued job is ranked again when it is sent, among the team's jobs unfinished then.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Job
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
