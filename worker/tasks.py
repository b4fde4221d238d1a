"""Celery tasks. They only translate between the database rows and the compression engine:
load the row, call the engine with a progress callback and a cancel check, store the
artifacts and metrics, make the state transition.

The engine is imported inside the tasks, so importing this module (as the worker does
at start) stays light.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.db import Database
from service.dberrors import database_unavailable
from service.models import Artifact, DatasetUpload, Job, JobEvent, ModelUpload, utcnow
from service.records import UPLOAD_TABLES, lock_blobs, release_blob
from service.settings import Settings, get_settings
from service.states import TERMINAL, JobNotFound, JobState, lock_job, transition
from service.store import BlobStore, make_store

from .celery_app import RUN_JOB, VALIDATE_UPLOAD, app

log = logging.getLogger(__name__)
DB_RETRY: dict[str, Any] = {"autoretry_for": (OperationalError,), "retry_backoff": True, "max_retries": 8}
"""A database that is briefly away delays a task instead of losing it (the job stays QUEUED)."""
ACTIVE = (JobState.RUNNING.value, JobState.CANCELLING.value)
T = TypeVar("T")
FINISH_RETRY_S = 300.0
"""How long a worker keeps trying to record a job's outcome while the database is away. Safe to
wait that long: the heartbeat keeps beating meanwhile, and if the reaper gives up on the attempt
anyway, fencing drops this outcome."""
MODEL_FORMAT_OF_KIND = {
    "zoo": "zoo_zip",
    "hf": "hf_zip",
    "onnx": "onnx",
    "torchscript": "torchscript",
    "exported_program": "exported_program",
}
SUFFIX = {
    "zoo_zip": ".zip",
    "hf_zip": ".zip",
    "onnx": ".onnx",
    "npz": ".npz",
    "safetensors": ".safetensors",
    "csv": ".csv",
    "text_csv": ".csv",
    "parquet": ".parquet",
    "jsonl": ".jsonl",
    "image_zip": ".zip",
}


def code_checkpoints(settings: Settings) -> dict[str, Any]:
    """The engine's options for TorchScript / ExportedProgram teachers: refused unless the operator
    set ``KDQ_ALLOW_CODE_CHECKPOINTS``, and then run only in a sandboxed child process."""
    from worker.compression.io.sandbox import SandboxLimits

    return {
        "allow_code": settings.allow_code_checkpoints,
        "sandbox": SandboxLimits(
            memory_bytes=settings.sandbox_memory_bytes, cpu_seconds=settings.sandbox_cpu_seconds
        ),
    }


def internal_problem(what: str) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": "Internal error",
        "status": 500,
        "code": "internal_error",
        "detail": f"{what} failed because of an internal error; it has been logged",
    }


def input_problem(exc: Exception) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": "Invalid input",
        "status": 422,
        "code": getattr(exc, "code", "invalid_input"),
        "detail": str(exc),
    }


def jsonable(value: Any) -> Any:
    """JSON-safe (Postgres JSONB rejects NaN): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    store: BlobStore
    pid: int


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's database and store (built after the prefork, once per child)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        assert settings.storage_dir is not None
        _runtime = Runtime(
            settings, Database(settings.database_url), make_store(settings.storage_dir), os.getpid()
        )
    return _runtime


def local_name(stem: str, fmt: str, filename: str | None) -> str:
    """A file name whose suffix tells the engine's format detection what the blob is."""
    suffix = SUFFIX.get(fmt) or (Path(filename).suffix.lower() if filename else "")
    return stem + suffix


# --- upload validation ----------------------------------------------------------------------


@app.task(name=VALIDATE_UPLOAD, **DB_RETRY)
def validate_upload(kind: str, upload_id: str) -> None:
    """Inspect one upload with the engine's loaders; record its summary or why it is invalid."""
    from worker.compression.errors import InputError
    from worker.compression.spec import DataSpec

    rt = runtime()
    table = UPLOAD_TABLES[kind]
    with rt.db.read() as s:
        row = s.get(table, upload_id)
    if row is None or row.state != "validating":
        return
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    rt.settings.work_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(dir=rt.settings.work_dir, prefix="validate-") as tmp:
        path = rt.store.fetch(row.sha256, Path(tmp) / local_name(kind, row.format, row.filename))
        try:
            from worker.compression.io.validate import validate_dataset, validate_model

            if isinstance(row, ModelUpload):
                summary = validate_model(path, row.format, **code_checkpoints(rt.settings))
            else:
                assert isinstance(row, DatasetUpload)
                summary = validate_dataset(path, DataSpec.model_validate(row.options))
        except InputError as exc:
            error = input_problem(exc)
        except Exception:
            log.exception("validating %s %s failed", kind, upload_id)
            error = internal_problem("validation")
    with rt.db.write() as s:
        row = s.get(table, upload_id, with_for_update=True)
        if row is None or row.state != "validating":
            return
        if error is not None:
            row.state, row.error = "invalid", error
            return
        row.state, row.summary = "ready", jsonable(summary)
        if isinstance(row, ModelUpload) and row.format == "auto" and summary:
            row.format = MODEL_FORMAT_OF_KIND.get(summary.get("kind", ""), row.format)


# --- compression jobs ------------------------------------------------------------------------


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


def _owner(s: Session, job_id: str) -> tuple[str | None, int | None]:
    """The job's state and attempt number (None, None when it is gone)."""
    row = s.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).one_or_none()
    return (row.state, row.attempts) if row is not None else (None, None)


def _database_retry(what: str, fn: Callable[[], T], within_s: float) -> T:
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


class ProgressRecorder:
    """The engine's progress callback: records progress at most every ``interval`` seconds, but
    always the last report of each stage (and every log message), as job_event rows.

    The engine never waits for the database: reports are handed to a writer thread, which
    writes at most once every ``interval``, everything handed over since its last write in
    one transaction (the database's load does not grow with the number of stages or log
    lines). Before the final transition, `take` (the rows go in that transaction) or `flush`
    (writes now, returns once written), so the events keep their order; `close` at the end.
    An error the writer meets is raised in the engine's thread at its next report.

    Each write is fenced (`Fence`); a database that is briefly away only delays the rows (they
    are kept and written with the next write) instead of stopping the job."""

    def __init__(self, db: Database, job_id: str, interval: float, fence: Fence | None = None) -> None:
        self.db, self.job_id, self.interval = db, job_id, interval
        self.fence = fence or Fence(job_id, None)
        self.stage: str | None = None
        self.pending: Any = None
        self.logs: list[dict[str, Any]] = []
        self.last_handoff = 0.0
        self.database_away = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: list[tuple[Any, list[dict[str, Any]]]] = []
        """(progress or None, log lines) handed over and not yet written, oldest first."""
        self._writing = threading.Lock()  # one write at a time, batches in the order handed over
        self._writer: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None

    def __call__(self, p: Any) -> None:
        self._raise_writer_error()
        with self._lock:
            first = p.stage != self.stage
            if first:
                self._handoff()  # the last report of the previous stage, before this one's lines
                self.stage = p.stage
            if p.message:
                self.logs.append({"stage": p.stage, "message": p.message})
            self.pending = p
            if first or time.monotonic() - self.last_handoff >= self.interval:
                self._handoff()

    def log(self, message: str, **data: Any) -> None:
        self._raise_writer_error()
        with self._lock:
            self.logs.append({"stage": self.stage, "message": message, **data})
            self._handoff()

    def flush(self) -> None:
        """Write everything reported so far and return once it is written (or kept for later,
        when the database is away)."""
        with self._lock:
            self._handoff()
        self._drain()

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything reported and not yet written, as (kind, data) rows, for the caller to write
        itself (with the final transition, `finish`); nothing is written here after that."""
        with self._writing:
            with self._lock:
                self._handoff()
                batch, self._batch = self._batch, []
                self._closed = True
                self._wake.notify()
            if self.fence.lost.is_set():
                return []
            return [(row.kind, row.data) for row in self._rows(batch)[1]]

    def close(self) -> None:
        """Write what is left, then stop the writer thread."""
        with self._lock:
            self._handoff()
            self._closed = True
            self._wake.notify()
        if self._writer is not None:
            self._writer.join()

    def _handoff(self) -> None:
        """(lock held) Hand the pending report and log lines to the writer thread."""
        if (self.pending is None and not self.logs) or self.fence.lost.is_set() or self._closed:
            return
        self._batch.append((self.pending, self.logs))
        self.pending, self.logs = None, []
        self.last_handoff = time.monotonic()
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, daemon=True, name=f"progress-{self.job_id}")
            self._writer.start()
        self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._batch:
                    self._wake.wait()
                if self._closed and not self._batch:
                    return
            try:
                self._drain()
            except BaseException as exc:  # raised in the engine's thread at its next report
                self._error = exc
                return
            with self._lock:
                if self._closed and (self.database_away or not self._batch):
                    return  # (what the database did not take ends with the attempt)
                # at most one write per interval: what is handed over meanwhile goes in the next
                deadline = time.monotonic() + self.interval
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._wake.wait(left)

    def _drain(self) -> None:
        with self._writing:
            with self._lock:
                batch, self._batch = self._batch, []
            if not batch or self.fence.lost.is_set():
                return
            try:
                self._write(batch)
                if self.database_away:
                    log.info("job %s: the database is back; progress is written again", self.job_id)
                self.database_away = False
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if not self.database_away:
                    log.warning("job %s: progress kept for later, the database is unavailable (%s)",
                                self.job_id, type(exc).__name__)  # fmt: skip
                self.database_away = True
                with self._lock:  # written with the next write, throttled reports folded together
                    self._batch = _fold(batch + self._batch)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, batch: list[tuple[Any, list[dict[str, Any]]]]) -> None:
        values, rows = self._rows(batch)
        with self.db.write() as s:
            if s.execute(update(Job).where(*self.fence.where()).values(**values)).rowcount != 1:
                self.fence.lose(*_owner(s, self.job_id), "progress")
                return
            s.add_all(rows)

    def _rows(self, batch: list[tuple[Any, list[dict[str, Any]]]]) -> tuple[dict[str, Any], list[JobEvent]]:
        """The job's new column values and the event rows for a batch."""
        now = utcnow()
        values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
        rows: list[JobEvent] = []
        for p, logs in batch:
            rows += [JobEvent(job_id=self.job_id, kind="log", data=entry, created_at=now) for entry in logs]
            if p is None:
                continue
            data = jsonable(
                {
                    "stage": p.stage,
                    "step": p.step,
                    "total": p.total,
                    "fraction": p.fraction,
                    "loss": p.loss,
                    "metric": p.metric,
                    "eta_s": p.eta_s,
                }
            )
            values |= {
                "stage": p.stage,
                "progress_step": p.step,
                "progress_total": p.total,
                "eta_s": data["eta_s"],
            }
            rows.append(JobEvent(job_id=self.job_id, kind="progress", data=data, created_at=now))
        return values, rows


def _fold(batch: list[tuple[Any, list[dict[str, Any]]]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    """Reports kept while the database is away, with each run of one stage's reports folded into
    its last (every log line stays), so the backlog stays small however long the wait."""
    out: list[tuple[Any, list[dict[str, Any]]]] = []
    for p, logs in batch:
        if out and (out[-1][0] is None or (p is not None and out[-1][0].stage == p.stage)):
            prev, prev_logs = out[-1]
            out[-1] = (p if p is not None else prev, prev_logs + logs)
        else:
            out.append((p, logs))
    return out


class CancelCheck:
    """The engine's cancel check: reads the job's row at most every ``interval`` seconds.
    True once this attempt should stop: the job is no longer RUNNING (cancelled, requeued) or
    a newer attempt owns it (`Fence`). A database that is away answers "keep going"."""

    def __init__(self, db: Database, job_id: str, interval: float, fence: Fence | None = None) -> None:
        self.db, self.job_id, self.interval = db, job_id, interval
        self.fence = fence or Fence(job_id, None)
        self.last = 0.0
        self.stop = False

    def __call__(self) -> bool:
        if self.fence.lost.is_set():
            self.stop = True
        if not self.stop and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            try:
                with self.db.read() as s:
                    state, attempts = _owner(s, self.job_id)
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
                        state, attempts = _owner(s, self.job_id)
                        if state is None or JobState(state) not in TERMINAL:  # (finished: it just ended)
                            self.fence.lose(state, attempts, "heartbeat")
                        return
            except Exception as exc:  # a missed beat is harmless; many in a row let the reaper step in
                unavailable = database_unavailable(exc)
                log.warning("heartbeat for job %s failed: %s", self.job_id, type(exc).__name__,
                            exc_info=not unavailable)  # fmt: skip


def begin(rt: Runtime, job_id: str) -> Job | None:
    """QUEUED → RUNNING (a new attempt), or None when this delivery has nothing to do (already
    running elsewhere, cancelled, finished, or unknown). The row lock makes this safe against
    duplicate deliveries: exactly one of them finds the job QUEUED."""
    with rt.db.write() as s:
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
    rt: Runtime,
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
        with rt.db.write() as s:
            job = lock_job(s, fence.job_id)
            state = JobState(job.state)
            if not fence.holds(job.state, job.attempts):
                fence.lose(job.state, job.attempts, f"outcome ({target.value})")
                return None
            reached, values = target, changes
            if state is JobState.CANCELLING and target in (JobState.SUCCEEDED, JobState.QUEUED):
                reached, values = JobState.CANCELLED, {}
            if reached is JobState.CANCELLED and state is not JobState.CANCELLING:
                log.warning("job %s is %s; an unasked-for cancellation is dropped", fence.job_id, state.value)
                return None
            if reached is JobState.SUCCEEDED:
                lock_blobs(s, [art.sha256 for art in artifacts or []])
                for art in artifacts or []:
                    if not rt.store.exists(art.sha256) and files and art.name in files:
                        rt.store.put_file(files[art.name])
                s.add_all(artifacts or [])
            s.add_all(JobEvent(job_id=fence.job_id, kind=kind, data=data, created_at=utcnow())
                      for kind, data in events)  # fmt: skip
            transition(s, fence.job_id, reached, **values)
            return reached

    return _database_retry(f"job {fence.job_id}: final state", attempt, FINISH_RETRY_S)


def owns(rt: Runtime, fence: Fence) -> bool:
    """Whether this attempt still owns its job (read, not locked: a cheap check before work)."""
    with rt.db.read() as s:
        state, attempts = _owner(s, fence.job_id)
    if state is None or attempts is None or not fence.holds(state, attempts):
        fence.lose(state, attempts, "results")
        return False
    return True


def _inputs(rt: Runtime, job: Job, folder: Path) -> dict[str, Path | None]:
    with rt.db.read() as s:
        teacher = s.get(ModelUpload, job.teacher_model_id)
        dataset = s.get(DatasetUpload, job.dataset_id)
        evalset = s.get(DatasetUpload, job.eval_dataset_id) if job.eval_dataset_id else None
    from worker.compression.errors import InputError

    if teacher is None or dataset is None or (job.eval_dataset_id and evalset is None):
        raise InputError("an upload this job uses was deleted before the job started")
    paths: dict[str, Path | None] = {"eval_dataset_path": None}
    for key, row in (("teacher_path", teacher), ("dataset_path", dataset), ("eval_dataset_path", evalset)):
        if row is not None:
            stem = key.removesuffix("_path")
            paths[key] = rt.store.fetch(row.sha256, folder / local_name(stem, row.format, row.filename))
    return paths


def _store_artifacts(rt: Runtime, job: Job, result: Any, stored: list[Artifact]) -> None:
    """Put each artifact's file in the store; ``stored`` collects the rows as they are made, so
    whatever was stored before a failure (a full disk) can be released. (One at a time: storing
    them in parallel measured no faster, 6.8 vs 6.5 ms for a job's six files; their fsyncs
    serialise on the file system's journal.)"""
    for art in result.artifacts:
        ref = rt.store.put_file(Path(art.path))
        stored.append(
            Artifact(
                job_id=job.id,
                name=art.name,
                team_id=job.team_id,
                kind=art.kind,
                sha256=ref.sha256,
                size_bytes=ref.size,
                description=art.description or "",
            )
        )


def take_over_work(folder: Path, attempt: int) -> tuple[Path, Path, int | None]:
    """This attempt's output and engine work folders, ``(output, work, previous attempt)``.

    The work folder holds the engine's checkpoints and caches (``compress(checkpoint_dir=…)``).
    The newest earlier attempt's work folder is moved here (one rename, any size), so the engine
    resumes from its last checkpoint; workers that share ``work_dir`` resume each other's jobs.
    Each attempt then writes only under its own ``attempt-N`` folder: an earlier attempt that
    wakes up finds its folder gone and cannot touch the files this attempt works with."""
    earlier = sorted(
        (int(p.name.removeprefix("attempt-")), p)
        for p in folder.glob("attempt-*")
        if p.name.removeprefix("attempt-").isdigit() and int(p.name.removeprefix("attempt-")) < attempt
    )
    mine = folder / f"attempt-{attempt}"
    shutil.rmtree(mine, ignore_errors=True)
    output, work = mine / "output", mine / "work"
    output.mkdir(parents=True)
    previous = None
    for number, path in reversed(earlier):
        if (path / "work").is_dir():
            os.rename(path / "work", work)
            previous = number
            break
    work.mkdir(exist_ok=True)
    for _, path in earlier:  # superseded attempts: their outputs are partial
        shutil.rmtree(path, ignore_errors=True)
    return output, work, previous


def _resumed_step(metrics: dict[str, Any]) -> int | None:
    train = (metrics.get("distillation") or {}).get("train") or {}
    step = (train.get("student") or {}).get("resumed_from_step")
    return step if isinstance(step, int) else None


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(exc: BaseException) -> OSError | None:
    """The out-of-space error behind ``exc`` (itself, or a cause it was raised from), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def storage_problem(exc: OSError) -> dict[str, Any]:
    where = f" ({exc.filename})" if exc.filename else ""
    return {
        "type": "about:blank",
        "title": "Insufficient Storage",
        "status": 507,
        "code": "storage_full",
        "detail": f"the job's results could not be written: no space left on the device{where}; "
        "nothing of this job was kept; submit it again once space has been freed",
    }


@app.task(name=RUN_JOB, **DB_RETRY)
def run_job(job_id: str) -> None:
    rt = runtime()
    job = begin(rt, job_id)
    if job is None:
        return
    from worker.compression.errors import Cancelled, InputError
    from worker.compression.spec import CompressSpec

    s = rt.settings
    fence = Fence(job_id, job.attempts)
    folder = Path(s.work_dir) / "jobs" / job_id  # type: ignore[arg-type]
    recorder = ProgressRecorder(rt.db, job_id, s.progress_interval_s, fence)
    heartbeat = Heartbeat(rt.db, job_id, s.heartbeat_interval_s, fence)
    heartbeat.start()
    outcome: JobState | None = None
    artifacts: list[Artifact] = []
    try:
        recorder.log(f"attempt {job.attempts} started on {job.worker}")
        out, work, previous = take_over_work(folder, job.attempts)
        if previous is not None:
            recorder.log(f"continuing from the checkpoints of attempt {previous}")
        inputs = _inputs(rt, job, folder / "inputs")
        from worker.compression.compress import compress

        started = time.perf_counter()
        result = compress(
            CompressSpec.model_validate(job.spec),
            **inputs,
            output_dir=out,
            progress=recorder,
            cancel=CancelCheck(rt.db, job_id, s.cancel_poll_s, fence),
            checkpoint_dir=work,
            **code_checkpoints(s),
        )
        engine_s = time.perf_counter() - started
        metrics = jsonable(result.metrics)
        if (step := _resumed_step(metrics)) is not None:
            recorder.log(f"resumed from step {step}", resumed_from_step=step)
        recorder.log(
            f"the engine finished in {engine_s:.2f} s; storing the results", engine_s=round(engine_s, 3)
        )
        if owns(rt, fence):
            _store_artifacts(rt, job, result, artifacts)
            outcome = finish(
                rt,
                fence,
                JobState.SUCCEEDED,
                metrics=metrics,
                summary=metrics.get("summary"),
                stage="done",
                artifacts=artifacts,
                files={a.name: Path(a.path) for a in result.artifacts},
                events=recorder.take(),  # every event before the final state's
            )
    except Cancelled:
        recorder.flush()
        outcome = finish(rt, fence, JobState.CANCELLED)
    except InputError as exc:
        recorder.flush()
        outcome = finish(rt, fence, JobState.FAILED, error=input_problem(exc))
    except Exception as exc:
        recorder.flush()
        if (full := storage_full(exc)) is not None:
            log.error("job %s: out of space: %s", job_id, full)
            outcome = finish(rt, fence, JobState.FAILED, error=storage_problem(full))
        elif database_unavailable(exc):  # hand the job back; the relay sends it again
            log.warning("job %s: the database is unavailable (%s); handing the job back", job_id, exc)
            outcome = finish(rt, fence, JobState.QUEUED)
        else:
            log.exception("job %s failed", job_id)
            outcome = finish(rt, fence, JobState.FAILED, error=internal_problem("the job"))
    finally:
        recorder.close()
        heartbeat.done.set()
        heartbeat.join()
        if outcome is not JobState.SUCCEEDED and artifacts:  # stored, then cancelled, failed or superseded
            released = sum(release_blob(rt.db, rt.store, art.sha256) for art in artifacts)
            log.info("job %s: %d stored artifact(s) released, %d deleted", job_id, len(artifacts), released)
        if outcome in TERMINAL and not s.job_tmp_keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif fence.lost.is_set():  # superseded: only this attempt's own folder is ours to touch
            mine = folder / f"attempt-{job.attempts}"
            ended = fence.seen_state is None or JobState(fence.seen_state) in TERMINAL
            # its checkpoints stay for the attempt that takes the job over, unless the job is over
            shutil.rmtree(mine if ended else mine / "output", ignore_errors=True)
        # (otherwise the job was handed back, or its database stayed away: the checkpoints stay
        # for the next attempt, which the relay or the reaper starts)
    log.info("job %s attempt %s: %s", job_id, job.attempts, outcome.value if outcome else "superseded")
