"""Server-Sent Events for one job, read from the job_event table.

A stream reads its job's events when a notice says there are new ones (`service.core.notices`),
and every ``sse_poll_s`` in any case. Each event carries its row id as the SSE ``id``, so a client that reconnects with
``Last-Event-ID`` resumes exactly where it stopped. The stream ends after the event
that made the job terminal (state changes are written in the same transaction as the
new state, so "terminal and nothing newer" means nothing more will ever come).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ..core.models import Job, JobEvent
from ..core.progress import overall, plan_of
from ..core.states import TERMINAL, JobState

if TYPE_CHECKING:
    from .deps import Context

BATCH = 500


def has_more_events(s: Session, job_id: str, after: int) -> bool:
    """Whether a stream from ``after`` would send anything (an unfinished job always may)."""
    state = s.scalar(select(Job.state).where(Job.id == job_id))
    if state is None:
        return False
    if JobState(state) not in TERMINAL:
        return True
    return bool(s.scalar(select(exists().where(JobEvent.job_id == job_id, JobEvent.id > after))))


def _fetch(ctx: Context, job_id: str, after: int) -> tuple[list[JobEvent], bool]:
    """Events after ``after`` and whether the job had finished when they were read."""
    with ctx.db.read() as s:
        state = s.scalar(select(Job.state).where(Job.id == job_id))
        events = list(
            s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(BATCH)
            )
        )
    finished = state is None or JobState(state) in TERMINAL
    return events, finished and len(events) < BATCH


def _plan(ctx: Context, job_id: str) -> str:
    with ctx.db.read() as s:
        return plan_of(s.scalar(select(Job.spec).where(Job.id == job_id)))


def format_event(event: JobEvent, plan: str = "single") -> str:
    """One SSE event; a progress event also carries the job's ``overall`` fraction done."""
    data = {**event.data, "at": event.created_at.isoformat()}
    if event.kind == "progress" and "overall" not in data:
        data["overall"] = overall(plan, data.get("stage"), data.get("fraction") or 0.0)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(ctx: Context, job_id: str, after: int) -> AsyncIterator[str]:
    poll, keepalive = ctx.settings.sse_poll_s, ctx.settings.sse_keepalive_s
    yield f"retry: {int(poll * 4000)}\n\n"
    quiet_since = time.monotonic()
    plan = await anyio.to_thread.run_sync(_plan, ctx, job_id)
    with ctx.notices.watch(job_id) as changed:  # before the first read: no notice slips between
        while True:
            changed.clear()
            events, finished = await anyio.to_thread.run_sync(_fetch, ctx, job_id, after)
            for event in events:
                yield format_event(event, plan)
                after = event.id
            if finished or ctx.notices.closing:
                return
            if events:
                quiet_since = time.monotonic()
                continue
            if time.monotonic() - quiet_since >= keepalive:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
            with anyio.move_on_after(min(poll, keepalive)):
                await changed.wait()
            if ctx.notices.closing:
                return
