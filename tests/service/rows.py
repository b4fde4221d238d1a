"""Job rows written straight to the database, for tests of the parts that read them."""

from __future__ import annotations

import os
from typing import Any

from service.core.db import Database
from service.core.models import Job
from service.core.states import JobState


def add_job(db: Database, state: JobState = JobState.QUEUED, **values: Any) -> str:
    job = Job(
        id=f"job_{os.urandom(8).hex()}",
        team_id="default",
        state=state.value,
        queue="cpu",
        spec={},
        teacher_model_id="m",
        dataset_id="d",
        **values,
    )
    with db.write() as s:
        s.add(job)
    return job.id
