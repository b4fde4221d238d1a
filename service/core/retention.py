"""Retention: delete uploads and finished jobs' artifacts once they are older than configured.

* a model or dataset is deleted ``uploads_retention_s`` after it was uploaded, unless a job
  that has not finished still uses it (it goes on a later pass);
* a finished job's artifacts are deleted ``artifacts_retention_s`` after the job finished
  (the job row stays, with its state, summary and metrics; its downloads answer 404).

A blob is deleted only when no upload or artifact refers to it any more (`release_blob`,
re-checked under the blob's lock in the deleting transaction). Safe to run from every
API replica at once: each row is deleted by whoever gets there first.

What remains: an upload swept while a job naming it is being submitted (the job was checked
a moment before) leaves that job to fail when its worker finds the upload gone, as with a
concurrent DELETE. (A job's artifact with exactly the bytes of a blob swept at that moment is
safe: the worker records its artifacts under the blobs' locks and stores a blob again if a
sweep deleted it first, `service.core.lifecycle.finish`.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Database
from .models import Artifact, DatasetUpload, Job, ModelUpload, utcnow
from .records import release_blob
from .settings import Settings
from .states import TERMINAL
from .store import BlobStore

log = logging.getLogger(__name__)
BATCH = 500
_FINISHED = [s.value for s in TERMINAL]


@dataclass
class SweepResult:
    uploads: list[str] = field(default_factory=list)
    """Ids of the deleted models and datasets."""
    artifacts: int = 0
    blobs: int = 0


def _enabled(seconds: float | None) -> bool:
    return bool(seconds and seconds > 0)


def _in_use(session: Session, upload_id: str) -> bool:
    refs = (
        (Job.teacher_model_id == upload_id) | (Job.dataset_id == upload_id) | (Job.eval_dataset_id == upload_id)
    )
    stmt = select(Job.id).where(refs, Job.state.not_in(_FINISHED)).limit(1)
    return session.scalars(stmt).first() is not None


def _sweep_uploads(db: Database, store: BlobStore, cutoff: datetime, result: SweepResult) -> None:
    for table in (ModelUpload, DatasetUpload):
        skipped: set[str] = set()
        while True:
            with db.read() as s:
                stmt = select(table.id).where(table.created_at < cutoff).order_by(table.created_at)
                if skipped:
                    stmt = stmt.where(table.id.not_in(skipped))
                ids = list(s.scalars(stmt.limit(BATCH)))
            if not ids:
                break
            for ident in ids:
                with db.write() as s:
                    row = s.get(table, ident)
                    if row is None:  # deleted meanwhile (DELETE, another replica)
                        continue
                    if _in_use(s, ident):
                        skipped.add(ident)
                        continue
                    sha = row.sha256
                    s.delete(row)
                result.uploads.append(ident)
                result.blobs += release_blob(db, store, sha)


def _sweep_artifacts(db: Database, store: BlobStore, cutoff: datetime, result: SweepResult) -> None:
    while True:
        with db.read() as s:
            stmt = (
                select(Artifact.job_id, Artifact.name)
                .join(Job, Job.id == Artifact.job_id)
                .where(Job.state.in_(_FINISHED), Job.finished_at < cutoff)
                .limit(BATCH)
            )
            keys = list(s.execute(stmt).tuples())
        if not keys:
            break
        released: set[str] = set()
        with db.write() as s:
            for key in keys:
                art = s.get(Artifact, key)
                if art is not None:
                    released.add(art.sha256)
                    s.delete(art)
                    result.artifacts += 1
        for sha in released:
            result.blobs += release_blob(db, store, sha)


def sweep(db: Database, store: BlobStore, settings: Settings, now: datetime | None = None) -> SweepResult:
    """Delete everything that has expired; what was deleted."""
    now = now or utcnow()
    result = SweepResult()
    if _enabled(settings.uploads_retention_s):
        assert settings.uploads_retention_s is not None
        _sweep_uploads(db, store, now - timedelta(seconds=settings.uploads_retention_s), result)
    if _enabled(settings.artifacts_retention_s):
        assert settings.artifacts_retention_s is not None
        _sweep_artifacts(db, store, now - timedelta(seconds=settings.artifacts_retention_s), result)
    if result.uploads or result.artifacts:
        log.info(
            "retention: deleted %d uploads, %d artifacts, %d blobs",
            len(result.uploads),
            result.artifacts,
            result.blobs,
        )
    return result


def retention_enabled(settings: Settings) -> bool:
    return settings.retention_interval_s > 0 and (
        _enabled(settings.uploads_retention_s) or _enabled(settings.artifacts_retention_s)
    )
