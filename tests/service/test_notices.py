"""Job notices: an API process hears, within moments, that a job's events were committed
(by any process), and hears nothing of a rolled-back transaction."""

from __future__ import annotations

import asyncio

import pytest

from service.core.db import Database
from service.core.models import JobEvent, utcnow
from service.core.notices import JobNotices
from service.core.states import JobState, transition

from .rows import add_job


@pytest.fixture
def db_url(unit_pg_url: str) -> str:
    return unit_pg_url


async def _started(notices: JobNotices) -> None:
    notices.WAIT_S = 30.0  # a notice must wake the watchers at once, not when the listener looks up
    notices.start()
    for _ in range(100):  # the listener connects in its own thread
        if notices.listening:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the notices listener did not start")


def test_a_committed_event_wakes_the_watchers_of_its_job_only(db_url: str) -> None:
    writer = Database(db_url)  # as a worker: another engine, its own connections
    job, other = add_job(writer, JobState.QUEUED), add_job(writer, JobState.QUEUED)

    async def scenario() -> None:
        notices = JobNotices(db_url)
        await _started(notices)
        try:
            with notices.watch(job) as changed, notices.watch(other) as unrelated:
                await asyncio.to_thread(_begin, writer, job)
                await asyncio.wait_for(changed.wait(), 5)
                await asyncio.sleep(0.3)
                assert not unrelated.is_set()
        finally:
            notices.stop()

    asyncio.run(scenario())


def test_a_rolled_back_event_wakes_nobody(db_url: str) -> None:
    writer = Database(db_url)
    job = add_job(writer, JobState.RUNNING)

    def rolled_back() -> None:
        with pytest.raises(RuntimeError), writer.write() as s:
            s.add(JobEvent(job_id=job, kind="log", data={"message": "never"}, created_at=utcnow()))
            s.flush()
            raise RuntimeError("abort")

    async def scenario() -> None:
        notices = JobNotices(db_url)
        await _started(notices)
        try:
            with notices.watch(job) as changed:
                await asyncio.to_thread(rolled_back)
                await asyncio.sleep(0.5)
                assert not changed.is_set()
        finally:
            notices.stop()

    asyncio.run(scenario())


def _begin(db: Database, job_id: str) -> None:
    with db.write() as s:
        transition(s, job_id, JobState.RUNNING)
