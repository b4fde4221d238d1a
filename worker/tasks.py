"""Celery tasks. They only translate between the database rows and the compression engine:
load the row, call the engine with a progress callback and a cancel check, store the
artifacts and metrics, make the state transition.

The engine is imported inside the tasks, so importing this module (as the worker does
at start) stays light.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from service.db import Database
from service.models import Artifact, DatasetUpload, Job, JobEvent, ModelUpload, utcnow
from service.records import UPLOAD_TABLES, release_blob
from service.settings import Settings, get_settings
from service.states import JobNotFound, JobState, lock_job, transition
from service.store import BlobStore, make_store

from .celery_app import RUN_JOB, VALIDATE_UPLOAD, app

log = logging.getLogger(__name__)
DB_RETRY: dict[str, Any] = {"autoretry_for": (OperationalError,), "retry_backoff": True, "max_retries": 8}
"""A database that is briefly away delays a task instead of losing it (the job stays QUEUED)."""
ACTIVE = (JobState.RUNNING.value, JobState.CANCELLING.value)
MODEL_FORMAT_OF_KIND = {"zoo": "zoo_zip", "hf": "hf_zip", "onnx": "onnx"}
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
            from worker.compression.validate import validate_dataset, validate_model

            if isinstance(row, ModelUpload):
                summary = validate_model(path, row.format)
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


class ProgressRecorder:
    """The engine's progress callback: writes progress at most every ``interval`` seconds, but
    always the last report of each stage (and every log message), as job_event rows."""

    def __init__(self, db: Database, job_id: str, interval: float) -> None:
        self.db, self.job_id, self.interval = db, job_id, interval
        self.stage: str | None = None
        self.pending: Any = None
        self.logs: list[dict[str, Any]] = []
        self.last_write = 0.0

    def __call__(self, p: Any) -> None:
        if p.message:
            self.logs.append({"stage": p.stage, "message": p.message})
        if p.stage != self.stage:
            self.flush()  # the last report of the previous stage
            self.stage = p.stage
            self.pending = p
            self.flush()
            return
        self.pending = p
        if time.monotonic() - self.last_write >= self.interval:
            self.flush()

    def log(self, message: str, **data: Any) -> None:
        self.logs.append({"stage": self.stage, "message": message, **data})
        self.flush()

    def flush(self) -> None:
        p, logs = self.pending, self.logs
        if p is None and not logs:
            return
        self.pending, self.logs = None, []
        now = utcnow()
        with self.db.write() as s:
            for entry in logs:
                s.add(JobEvent(job_id=self.job_id, kind="log", data=entry, created_at=now))
            if p is not None:
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
                s.add(JobEvent(job_id=self.job_id, kind="progress", data=data, created_at=now))
                s.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.state.in_(ACTIVE))
                    .values(
                        stage=p.stage,
                        progress_step=p.step,
                        progress_total=p.total,
                        eta_s=data["eta_s"],
                        heartbeat_at=now,
                        updated_at=now,
                    )
                )
        self.last_write = time.monotonic()


class CancelCheck:
    """The engine's cancel check: reads the job's state at most every ``interval`` seconds.
    True once the job is no longer RUNNING (cancelled, or taken over after a lost heartbeat)."""

    def __init__(self, db: Database, job_id: str, interval: float) -> None:
        self.db, self.job_id, self.interval = db, job_id, interval
        self.last = 0.0
        self.stop = False

    def __call__(self) -> bool:
        if not self.stop and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            with self.db.read() as s:
                self.stop = s.scalar(select(Job.state).where(Job.id == self.job_id)) != JobState.RUNNING.value
        return self.stop


class Heartbeat(threading.Thread):
    """Keeps ``heartbeat_at`` fresh while the engine works (even in stages without progress)."""

    def __init__(self, db: Database, job_id: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.db, self.job_id, self.interval = db, job_id, interval
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                with self.db.write() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.state.in_(ACTIVE))
                        .values(heartbeat_at=utcnow())
                    )
            except Exception:  # a missed beat is harmless; many in a row let the reaper step in
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


def begin(rt: Runtime, job_id: str) -> Job | None:
    """QUEUED → RUNNING, or None when this delivery has nothing to do (already running
    elsewhere, cancelled, finished, or unknown)."""
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
    rt: Runtime, job_id: str, target: JobState, *, artifacts: list[Artifact] | None = None, **changes: Any
) -> JobState | None:
    """Make the final transition if this attempt still owns the job. A cancel request wins
    over success; returns the state reached (None when the job had moved on)."""
    with rt.db.write() as s:
        job = lock_job(s, job_id)
        state = JobState(job.state)
        if state is JobState.CANCELLING and target is JobState.SUCCEEDED:
            target, changes = JobState.CANCELLED, {}
        if state not in (JobState.RUNNING, JobState.CANCELLING) or (
            target is JobState.CANCELLED and state is not JobState.CANCELLING
        ):
            log.warning(
                "job %s is %s; this attempt's outcome (%s) is dropped", job_id, state.value, target.value
            )
            return None
        if target is JobState.SUCCEEDED:
            s.add_all(artifacts or [])
        transition(s, job_id, target, **changes)
        return target


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


def _store_artifacts(rt: Runtime, job: Job, result: Any) -> list[Artifact]:
    rows = []
    for art in result.artifacts:
        ref = rt.store.put_file(Path(art.path))
        rows.append(
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
    return rows


@app.task(name=RUN_JOB, **DB_RETRY)
def run_job(job_id: str) -> None:
    rt = runtime()
    job = begin(rt, job_id)
    if job is None:
        return
    from worker.compression.errors import Cancelled, InputError
    from worker.compression.spec import CompressSpec

    s = rt.settings
    folder = Path(s.work_dir) / "jobs" / job_id  # type: ignore[arg-type]
    out = folder / f"attempt-{job.attempts}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recorder = ProgressRecorder(rt.db, job_id, s.progress_interval_s)
    heartbeat = Heartbeat(rt.db, job_id, s.heartbeat_interval_s)
    heartbeat.start()
    outcome: JobState | None = None
    artifacts: list[Artifact] = []
    try:
        recorder.log(f"attempt {job.attempts} started on {job.worker}")
        inputs = _inputs(rt, job, folder / "inputs")
        from worker.compression.compress import compress

        started = time.perf_counter()
        result = compress(
            CompressSpec.model_validate(job.spec),
            **inputs,
            output_dir=out,
            progress=recorder,
            cancel=CancelCheck(rt.db, job_id, s.cancel_poll_s),
            checkpoint_dir=folder / "checkpoints",
        )
        engine_s = time.perf_counter() - started
        recorder.log(
            f"the engine finished in {engine_s:.2f} s; storing the results", engine_s=round(engine_s, 3)
        )
        artifacts = _store_artifacts(rt, job, result)
        metrics = jsonable(result.metrics)
        outcome = finish(
            rt,
            job_id,
            JobState.SUCCEEDED,
            metrics=metrics,
            summary=metrics.get("summary"),
            stage="done",
            artifacts=artifacts,
        )
    except Cancelled:
        recorder.flush()
        outcome = finish(rt, job_id, JobState.CANCELLED)
    except InputError as exc:
        recorder.flush()
        outcome = finish(rt, job_id, JobState.FAILED, error=input_problem(exc))
    except Exception:
        log.exception("job %s failed", job_id)
        recorder.flush()
        outcome = finish(rt, job_id, JobState.FAILED, error=internal_problem("the job"))
    finally:
        heartbeat.done.set()
        heartbeat.join()
        if outcome is not None and not s.job_tmp_keep:
            shutil.rmtree(folder, ignore_errors=True)
        if outcome is not JobState.SUCCEEDED:
            for art in artifacts:  # stored, then cancelled or superseded
                release_blob(rt.db, rt.store, art.sha256)
    log.info("job %s: %s", job_id, outcome.value if outcome else "superseded")
