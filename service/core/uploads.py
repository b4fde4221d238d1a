"""An upload's validation, as a job's run: begun under the row lock with an attempt count,
kept alive by a heartbeat, finished once; a validation whose worker died is sent again by the
reaper, and an upload whose validation keeps killing its worker ends ``invalid`` after
``max_validation_attempts`` instead of looping forever."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import update

from .db import Database
from .dberrors import database_unavailable
from .models import DatasetUpload, ModelUpload, utcnow
from .states import UPLOAD_TRANSITIONS, UploadState

log = logging.getLogger(__name__)
UploadTable = type[ModelUpload | DatasetUpload]
GAVE_UP = {"type": "about:blank", "title": "Validation did not finish", "status": 422, "code": "validation_lost"}


def begin_validation(db: Database, table: UploadTable, upload_id: str, max_attempts: int) -> Any | None:
    """Count a new attempt at validating the upload and return its row, or None when there is nothing
    to do (gone, already validated) or when it ended ``invalid`` here because its earlier attempts
    never finished (their worker was lost each time)."""
    with db.write() as s:
        row = s.get(table, upload_id, with_for_update=True)
        if row is None or row.state != UploadState.VALIDATING:
            return None
        if row.attempts >= max_attempts:
            detail = (f"validating this upload did not finish in {row.attempts} attempts: the worker running it "
                      "was lost each time; it is not tried again")  # fmt: skip
            _finish(row, error={**GAVE_UP, "detail": detail})
            return None
        row.attempts += 1
        row.heartbeat_at = utcnow()
        return row


def finish_validation(
    session: Any,
    table: UploadTable,
    upload_id: str,
    *,
    summary: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    detected_format: str | None = None,
) -> UploadState | None:
    """``validating → invalid`` (with ``error``) or ``ready`` (with ``summary``, and the detected
    format of an ``auto`` model), under the row lock; None when the upload is gone or was already
    validated (a duplicate delivery)."""
    row = session.get(table, upload_id, with_for_update=True)
    if row is None:
        return None
    return _finish(row, summary=summary, error=error, detected_format=detected_format)


def _finish(row: Any, *, summary: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
            detected_format: str | None = None) -> UploadState | None:  # fmt: skip
    target = UploadState.INVALID if error is not None else UploadState.READY
    if target not in UPLOAD_TRANSITIONS.get(UploadState(row.state), frozenset()):
        return None
    row.state = target.value
    row.heartbeat_at = None
    if error is not None:
        row.error = error
    else:
        row.summary = summary
        if detected_format:
            row.format = detected_format
    return target


@contextmanager
def validation_heartbeat(db: Database, table: UploadTable, upload_id: str, interval: float) -> Iterator[None]:
    """Keep ``heartbeat_at`` fresh while the validation runs (the reaper's sign of life)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            try:
                with db.write() as s:
                    still = (table.id == upload_id, table.state == UploadState.VALIDATING.value)
                    s.execute(update(table).where(*still).values(heartbeat_at=utcnow()))
            except Exception as exc:  # a missed beat is harmless; many in a row let the reaper step in
                log.warning("heartbeat for upload %s failed: %s", upload_id, type(exc).__name__,
                            exc_info=not database_unavailable(exc))  # fmt: skip

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{upload_id}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
