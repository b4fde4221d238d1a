"""Database helpers shared by the API and the worker (no FastAPI, no torch)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import exists, select, text
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


def lock_blob(session: Session, sha256: str) -> None:
    """Serialise, until the transaction ends, everything that adds or drops a reference to this
    blob: a PostgreSQL advisory lock on the hash. Taken by `release_blob` and by the API before
    it inserts an upload row."""
    lock_blobs(session, [sha256])


def lock_blobs(session: Session, hashes: Iterable[str]) -> None:
    """`lock_blob` for several blobs in one round trip, always in the same (sorted) order, so
    two transactions that lock overlapping sets cannot deadlock."""
    keys = sorted({int.from_bytes(bytes.fromhex(sha256[:16]), "big", signed=True) for sha256 in hashes})
    if keys:
        session.execute(
            text(
                "SELECT pg_advisory_xact_lock(k)"
                " FROM unnest(CAST(:keys AS bigint[])) WITH ORDINALITY AS t(k, n) ORDER BY n"
            ),
            {"keys": keys},
        )


def release_blob(db: Database, store: BlobStore, sha256: str) -> bool:
    """Delete the blob when nothing refers to it any more; True if it was deleted.

    The check and the deletion happen under `lock_blob`, inside one write transaction: an
    upload of the same bytes that inserts its row after this deletion finds the file gone
    when it checks (`service.api.routes.uploads`) and is refused with a retryable 503.
    """
    with db.write() as s:
        lock_blob(s, sha256)
        if blob_in_use(s, sha256):
            return False
        store.delete(sha256)
    return True
