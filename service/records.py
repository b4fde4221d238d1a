"""Database helpers shared by the API and the worker (no FastAPI, no torch)."""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from .db import Database
from .models import Artifact, DatasetUpload, ModelUpload
from .store import BlobStore

UPLOAD_TABLES: dict[str, type[ModelUpload | DatasetUpload]] = {"model": ModelUpload, "dataset": DatasetUpload}


def blob_in_use(session: Session, sha256: str) -> bool:
    """Whether any upload or artifact still refers to this blob."""
    return any(
        session.scalar(select(exists().where(table.sha256 == sha256)))
        for table in (ModelUpload, DatasetUpload, Artifact)
    )


def release_blob(db: Database, store: BlobStore, sha256: str) -> bool:
    """Delete the blob when nothing refers to it any more; True if it was deleted."""
    with db.write() as s:
        if blob_in_use(s, sha256):
            return False
    store.delete(sha256)
    return True
