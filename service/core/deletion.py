"""Deleting what a finished job stored: all its artifacts (the job stays, a tombstone for the record:
its spec, summary and events; ``deleted_at`` set) or one of them. The rows go in one transaction
under the job's row lock; then each blob is released (deleted when nothing else refers to it,
`records.release_blob`). Unfinished jobs are refused: cancel them first."""

from __future__ import annotations

from sqlalchemy import delete, select

from .db import Database
from .models import Artifact, JobEvent, utcnow
from .records import release_blob
from .states import TERMINAL, JobState, lock_job
from .store import BlobStore


class JobNotFinished(Exception):
    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}: only a finished job's files can be deleted; cancel it first")


def delete_artifacts(db: Database, store: BlobStore, job_id: str, name: str | None = None) -> list[str]:
    """Delete the job's artifacts (all, or the one called ``name``); the names deleted."""
    with db.write() as s:
        job = lock_job(s, job_id)
        if JobState(job.state) not in TERMINAL:
            raise JobNotFinished(job_id, job.state)
        stmt = select(Artifact.name, Artifact.sha256).where(Artifact.job_id == job_id)
        if name is not None:
            stmt = stmt.where(Artifact.name == name)
        rows = s.execute(stmt).all()
        if rows:
            names = [r.name for r in rows]
            s.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name.in_(names)))
            what = f"artifact {name}" if name is not None else f"its {len(rows)} artifacts"
            s.add(JobEvent(job_id=job_id, kind="log", data={"stage": None, "message": f"{what} deleted"},
                           created_at=utcnow()))  # fmt: skip
        if name is None:
            job.deleted_at = job.deleted_at or utcnow()
    for row in rows:
        release_blob(db, store, row.sha256)
    return [r.name for r in rows]
