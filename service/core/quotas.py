"""Per-team quotas, checked where a job or an upload is written.

* running jobs: a team's QUEUED + RUNNING + CANCELLING jobs, at most ``max_running_jobs``;
* stored bytes: a team's models + datasets + artifacts (``size_bytes`` as listed, so one
  file uploaded twice counts twice), at most ``max_stored_bytes``;
* submissions: jobs a team created in the last 60 seconds, at most
  ``max_submissions_per_minute`` (counted in the jobs table, so every API replica agrees).

The limits come from the team row when it sets them, else from the settings. Each check
runs in the write transaction that adds the row, after `lock_team` (``SELECT … FOR NO KEY
UPDATE``): two concurrent requests of one team cannot both pass on the last free slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Artifact, DatasetUpload, Job, ModelUpload, Team, utcnow
from .settings import Settings
from .states import JobState

ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.CANCELLING.value)
RATE_WINDOW_S = 60
RUNNING_RETRY_AFTER_S = 30
"""A hint only: when one of the team's jobs will finish is not known."""


@dataclass(frozen=True)
class Limits:
    max_running_jobs: int
    max_stored_bytes: int
    max_submissions_per_minute: int


def limits_for(session: Session, settings: Settings, team_id: str) -> Limits:
    team = session.get(Team, team_id)

    def pick(override: int | None, default: int) -> int:
        return default if override is None else override

    return Limits(
        pick(team.max_running_jobs if team else None, settings.max_running_jobs_per_team),
        pick(team.max_stored_bytes if team else None, settings.max_stored_bytes_per_team),
        pick(team.max_submissions_per_minute if team else None, settings.max_submissions_per_minute),
    )


def lock_team(session: Session, team_id: str) -> None:
    """Serialise the quota checks of one team until the transaction ends. (``NO KEY UPDATE``:
    rows that merely refer to the team, such as a worker's artifacts, are not held up.)"""
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update(key_share=True))


def stored_bytes(session: Session, team_id: str) -> int:
    parts = [
        select(func.coalesce(func.sum(t.size_bytes), 0)).where(t.team_id == team_id).scalar_subquery()
        for t in (ModelUpload, DatasetUpload, Artifact)
    ]
    return int(session.scalar(select(parts[0] + parts[1] + parts[2])) or 0)


class QuotaExceeded(Exception):
    """A team is over one of its quotas (the API answers 429 with ``code`` and ``Retry-After``)."""

    def __init__(self, detail: str, *, code: str = "quota_exceeded", retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail, self.code, self.retry_after = detail, code, retry_after



def check_storage(session: Session, settings: Settings, team_id: str, adding: int) -> None:
    """`QuotaExceeded` when ``adding`` more bytes would take the team over its storage quota."""
    limit = limits_for(session, settings, team_id).max_stored_bytes
    used = stored_bytes(session, team_id)
    if used + adding > limit:
        raise QuotaExceeded(
            f"team {team_id!r} stores {used} bytes; {adding} more would exceed its quota of {limit} bytes. "
            "Delete models, datasets or finished jobs' files you no longer need (DELETE /v1/models/{id}, "
            "/v1/datasets/{id}, /v1/jobs/{id}); nothing was stored"
        )


def check_submission(session: Session, settings: Settings, team_id: str) -> None:
    """`QuotaExceeded` when the team submits too fast, has too many unfinished jobs, or is over its
    storage quota (a job's artifacts would add to it). Call after `lock_team`."""
    limits = limits_for(session, settings, team_id)
    now = utcnow()
    window = now - timedelta(seconds=RATE_WINDOW_S)
    recent = list(
        session.scalars(
            select(Job.created_at)
            .where(Job.team_id == team_id, Job.created_at > window)
            .order_by(Job.created_at.desc())
            .limit(limits.max_submissions_per_minute)
        )
    )
    if len(recent) >= limits.max_submissions_per_minute:
        # the oldest of the newest `limit` submissions leaving the window frees one slot
        wait = recent[-1] + timedelta(seconds=RATE_WINDOW_S) - now
        raise QuotaExceeded(
            f"team {team_id!r} may submit {limits.max_submissions_per_minute} jobs per minute; "
            f"try again in {max(1, math.ceil(wait.total_seconds()))} s",
            code="rate_limited",
            retry_after=max(1, math.ceil(wait.total_seconds())),
        )
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.state.in_(ACTIVE))
    )
    if (active or 0) >= limits.max_running_jobs:
        raise QuotaExceeded(
            f"team {team_id!r} has {active} unfinished jobs (queued, running or cancelling); "
            f"its quota is {limits.max_running_jobs}. Wait for one to finish or cancel one",
            retry_after=RUNNING_RETRY_AFTER_S,
        )
    limit = limits.max_stored_bytes
    used = stored_bytes(session, team_id)
    if used >= limit:
        raise QuotaExceeded(
            f"team {team_id!r} stores {used} bytes, its whole quota of {limit} bytes, and a job adds "
            "artifacts. Delete models, datasets or finished jobs' files you no longer need (DELETE "
            "/v1/models/{id}, /v1/datasets/{id}, /v1/jobs/{id})"
        )


def time_budget_for(session: Session, settings: Settings, team_id: str) -> float:
    """The most training time a job of this team gets (the team row's override, else the setting)."""
    team = session.get(Team, team_id)
    override = team.job_time_budget_s if team is not None else None
    return settings.job_time_budget_s if override is None else override


def usage_of(session: Session, settings: Settings, team_id: str) -> dict[str, float | int]:
    """What the team uses against its quotas (``/v1/me``)."""
    limits = limits_for(session, settings, team_id)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.team_id == team_id, Job.state.in_(ACTIVE)))  # fmt: skip
    return {
        "stored_bytes": stored_bytes(session, team_id),
        "max_stored_bytes": limits.max_stored_bytes,
        "unfinished_jobs": int(active or 0),
        "max_unfinished_jobs": limits.max_running_jobs,
        "max_submissions_per_minute": limits.max_submissions_per_minute,
        "job_time_budget_s": time_budget_for(session, settings, team_id),
    }
