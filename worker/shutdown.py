"""A worker that is asked to stop hands its running job back instead of losing it.

SIGTERM reaches the worker's main process (`kdq serve` stopping, ``docker stop``), which begins
Celery's warm shutdown: it waits for the running task. Its pool child is not signalled (Celery
resets the child's SIGTERM to the default action, which would kill the task mid-write); instead
the main process leaves a mark (`request_stop`, Celery's ``worker_shutting_down``), the job's
cancel check sees it (`requested`), the engine stops at its next check, and the task returns the
job to QUEUED (`worker.tasks`): the next worker resumes it from its last checkpoint.

The mark is a file named after the main process's pid, in the temp folder, made at shutdown and
removed when a main process of that pid starts or ends.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _mark(main_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"kdq-worker-{main_pid}.stopping"


def request_stop() -> None:
    """In the worker's main process, as its warm shutdown begins."""
    try:
        _mark(os.getpid()).touch()
    except OSError as exc:  # the job then runs to its end, or is killed and later retried
        log.warning("could not ask the running job to hand itself back: %s", exc)


def forget() -> None:
    """In the worker's main process, as it starts and as it ends."""
    _mark(os.getpid()).unlink(missing_ok=True)


def requested() -> bool:
    """In a pool child: whether its main process is shutting down."""
    return _mark(os.getppid()).exists()
