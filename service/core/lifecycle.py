"""A job's life: every state change a job goes through, and the rules for which, in one place.

* the API's cancel (`request_cancel`), the reaper's verdict on a silent attempt (`reap_verdict`)
  and a worker's outcome (`finish`) all choose their target state here, and make it with
  `service.core.states.transition` (which checks the transition table);
* a worker's attempt: `begin` (QUEUED → RUNNING, a new attempt), its claim on the job (`Fence`),
  the `Heartbeat` that keeps it alive, the `CancelCheck` the engine polls, and `finish`.

The progress the attempt reports is recorded by `service.core.progress`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import Database
from .dberrors import database_unavailable
from .models import Artifact, Job, JobEvent, utcnow
from .outcomes import WORKER_LOST
from .records import lock_blobs
from .states import TERMINAL, JobNotFound, JobState, lock_job, transition
from .store import BlobStore

log = logging.getLogger(__name__)
ACTIVE = (JobState.RUNNING.value, JobState.CANCELLING.value)
T = TypeVar("T")
FINISH_RETRY_S = 300.0
"""How long a worker keeps trying to record a job's outcome while the database is away. Safe to
wait that long: the heartbeat keeps beating meanwhile, and if the reaper gives up on the attempt
anyway, fencing drops this outcome."""


class JobFinished(Exception):
    """A cancel asked of a job that already finished."""

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"job {job_id} already finished ({state.value}); there is nothing to cancel")
        self.state = state


# --- the choices ---------------------------------------------------------------------------


def request_cancel(session: Session, job: Job) -> Job:
    """The API's cancel, under the row lock: a queued job is cancelled at once; a running one
    becomes CANCELLING until its worker stops; one already cancelling stays so."""
    state = JobState(job.state)
    if state is JobState.QUEUED:
        return transition(session, job.id, JobState.CANCELLED)
    if state is JobState.RUNNING:
        return transition(session, job.id, JobState.CANCELLING)
    if state is JobState.CANCELLING:
        return job
    raise JobFinished(job.id, state)


def reap_verdict(job: Job, max_attempts: int) -> tuple[JobState, dict[str, Any]]:
    """What becomes of a job whose attempt stopped heartbeating: a cancel in progress is done;
    otherwise it is tried again, up to ``max_attempts``, then failed."""
    if job.state == JobState.CANCELLING:
        return JobState.CANCELLED, {}
    if job.attempts >= max_attempts:
        detail = f"the worker running this job stopped responding {job.attempts} times; giving up"
        return JobState.FAILED, {"error": {**WORKER_LOST, "detail": detail}}
    return JobState.QUEUED, {}


def outcome(current: JobState, wanted: JobState) -> JobState | None:
    """The state a worker's outcome takes the job to: a cancel request wins over success and over
    a hand-back; None when the worker may not end it so (an unasked-for cancellation)."""
    if current is JobState.CANCELLING and wanted in (JobState.SUCCEEDED, JobState.QUEUED):
        return JobState.CANCELLED
    if wanted is JobState.CANCELLED and current is not JobState.CANCELLING:
        return None
    return wanted


# --- an attempt ------------------------------------------------------------------------------


class Fence:
    """An attempt's claim on its job. Attempt ``n`` owns the job while the row's ``attempts`` is
    ``n`` and its state is RUNNING or CANCELLING; every write the attempt makes (progress,
    heartbeat, artifacts, the final state) is conditioned on that. When the reaper gave up on
    the attempt (its worker paused or lost its database past ``stale_after_s``) and another
    worker began attempt ``n + 1``, the old attempt's writes match no row: it notices, stops,
    and its outcome is dropped. ``attempt=None`` fences on the state only."""

    def __init__(self, job_id: str, attempt: int | None) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.lost = threading.Event()
        self.ended = threading.Event()
        """Set once this attempt made its own final transition (its heartbeat then stops quietly)."""
        self.seen_state: str | None = None
        """The job's state when this attempt found it had lost the job."""

    def where(self) -> list[Any]:
        conditions = [Job.id == self.job_id, Job.state.in_(ACTIVE)]
        if self.attempt is not None:
            conditions.append(Job.attempts == self.attempt)
        return conditions

    def holds(self, state: str, attempts: int) -> bool:
        return state in ACTIVE and (self.attempt is None or attempts == self.attempt)

    def lose(self, state: str | None, attempts: int | None, what: str) -> None:
        if not self.lost.is_set():
            self.seen_state = state
            self.lost.set()
            log.warning(
                "job %s: attempt %s no longer owns the job (now %s, attempt %s); its %s is dropped",
                self.job_id, self.attempt, state, attempts, what,
            )  # fmt: skip


def owner(s: Session, job_id: str) -> tuple[str | None, int | None]:
    """The job's state and attempt number (None, None when it is gone)."""
    row = s.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).one_or_none()
    return (row.state, row.attempts) if row is not None else (None, None)


def database_retry(what: str, fn: Callable[[], T], within_s: float) -> T:
    """Call ``fn``, retrying while the database is unavailable, for up to ``within_s`` seconds."""
    deadline, pause = time.monotonic() + within_s, 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if not database_unavailable(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(exc).__name__, pause)
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


class CancelCheck:
    """The engine's cancel check: reads the job's row at most every ``interval`` seconds.
    True once this attempt should stop: the job is no longer RUNNING (cancelled, requeued), a
    newer attempt owns it (`Fence`), or its worker is shutting down (``stopping``, after which
    `handing_back` is True). A database that is away answers "keep going"."""

    def __init__(self, db: Database, job_id: str, interval: float, fence: Fence | None = None,
                 stopping: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.db, self.job_id, self.interval = db, job_id, interval
        self.fence = fence or Fence(job_id, None)
        self.stopping = stopping
        self.last = 0.0
        self.stop = False
        self.handing_back = False

    def __call__(self) -> bool:
        if self.fence.lost.is_set():
            self.stop = True
        if not self.stop and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            if self.stopping():
                self.stop = self.handing_back = True
                return True
            try:
                with self.db.read() as s:
                    state, attempts = owner(s, self.job_id)
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                return False
            self.stop = state != JobState.RUNNING.value
            if state is None or attempts is None or not self.fence.holds(state, attempts):
                self.stop = True
                self.fence.lose(state, attempts, "work")
        return self.stop


class Heartbeat(threading.Thread):
    """Keeps ``heartbeat_at`` fresh while the engine works (even in stages without progress).
    Stops beating once a newer attempt owns the job (`Fence`)."""

    def __init__(self, db: Database, job_id: str, interval: float, fence: Fence | None = None) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.db, self.job_id, self.interval = db, job_id, interval
        self.fence = fence or Fence(job_id, None)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval) and not self.fence.lost.is_set():
            try:
                with self.db.write() as s:
                    beat = update(Job).where(*self.fence.where()).values(heartbeat_at=utcnow())
                    if s.execute(beat).rowcount != 1:
                        state, attempts = owner(s, self.job_id)
                        if not self.fence.ended.is_set() and (state is None or JobState(state) not in TERMINAL):
                            self.fence.lose(state, attempts, "heartbeat")
                        return
            except Exception as exc:  # a missed beat is harmless; many in a row let the reaper step in
                unavailable = database_unavailable(exc)
                log.warning("heartbeat for job %s failed: %s", self.job_id, type(exc).__name__,
                            exc_info=not unavailable)  # fmt: skip


def begin(db: Database, job_id: str) -> Job | None:
    """QUEUED → RUNNING (a new attempt), or None when this delivery has nothing to do (already
    running elsewhere, cancelled, finished, or unknown). The row lock makes this safe against
    duplicate deliveries: exactly one of them finds the job QUEUED."""
    with db.write() as s:
        try:
            job = lock_job(s, job_id)
        except JobNotFound:
            log.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.state != JobState.QUEUED.value:
            log.info("job %s is %s; dropping this delivery", job_id, job.state)
            return None
        return transition(s, job_id, JobState.RUNNING, worker=f"{socket.gethostname()}:{os.getpid()}")


def finish(
    db: Database,
    store: BlobStore,
    fence: Fence,
    target: JobState,
    *,
    artifacts: list[Artifact] | None = None,
    files: dict[str, Path] | None = None,
    events: Sequence[tuple[str, dict[str, Any]]] = (),
    **changes: Any,
) -> JobState | None:
    """Make the final transition (or hand the job back: QUEUED) if this attempt still owns the
    job. A cancel request wins over success and over a hand-back; returns the state reached
    (None when the job had moved on). Retried while the database is briefly away.

    ``events`` (kind, data) are recorded just before the state change (the progress recorder's
    last rows, `ProgressRecorder.take`: one transaction instead of two).

    Artifacts are recorded under each blob's lock (`lock_blob`), and a blob that a concurrent
    `release_blob` (of a superseded attempt with identical output) deleted is stored again
    from ``files`` first, so a recorded artifact always has its blob."""

    def attempt() -> JobState | None:
        with db.write() as s:
            job = lock_job(s, fence.job_id)
            state = JobState(job.state)
            if not fence.holds(job.state, job.attempts):
                fence.lose(job.state, job.attempts, f"outcome ({target.value})")
                return None
            reached = outcome(state, target)
            if reached is None:
                log.warning("job %s is %s; an unasked-for cancellation is dropped", fence.job_id, state.value)
                return None
            values = changes if reached is target else {}
            if reached is JobState.SUCCEEDED:
                lock_blobs(s, [art.sha256 for art in artifacts or []])
                for art in artifacts or []:
                    if not store.exists(art.sha256) and files and art.name in files:
                        store.put_file(files[art.name])
                s.add_all(artifacts or [])
            s.add_all(JobEvent(job_id=fence.job_id, kind=kind, data=data, created_at=utcnow())
                      for kind, data in events)  # fmt: skip
            transition(s, fence.job_id, reached, **values)
            fence.ended.set()
            return reached

    return database_retry(f"job {fence.job_id}: final state", attempt, FINISH_RETRY_S)


def owns(db: Database, fence: Fence) -> bool:
    """Whether this attempt still owns its job (read, not locked: a cheap check before work)."""
    with db.read() as s:
        state, attempts = owner(s, fence.job_id)
    if state is None or attempts is None or not fence.holds(state, attempts):
        fence.lose(state, attempts, "results")
        return False
    return True
