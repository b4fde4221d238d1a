"""Celery tasks: thin adapters between a row and one engine call.

`validate_upload` inspects one upload with the engine's loaders; `run_job` runs one job through
`compress()` with a progress recorder, a cancel check and a heartbeat, then stores the artifacts.
Either engine call runs in a confined child (`worker.confine`: memory, CPU, wall-time and
scratch limits per queue), so no input can take the worker down. Every state change and its
rules live in `service.core.lifecycle`; files in `worker.files`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy.exc import OperationalError

from service.core.db import Database
from service.core.dberrors import database_unavailable
from service.core.lifecycle import CancelCheck, Fence, Heartbeat, begin, finish, owns
from service.core.logs import job_context
from service.core.models import Artifact, Job, ModelUpload
from service.core.outcomes import (
    input_problem,
    internal_problem,
    resource_problem,
    storage_full,
    storage_problem,
)
from service.core.progress import ProgressRecorder
from service.core.queues import RUN_JOB, VALIDATE_UPLOAD
from service.core.records import UPLOAD_TABLES
from service.core.settings import Settings, get_settings
from service.core.states import TERMINAL, JobState
from service.core.store import BlobStore, StoreUnavailable
from service.core.stores import store_for
from service.core.uploads import (
    begin_validation,
    finish_validation,
    validation_heartbeat,
)

from . import engine_calls, shutdown
from .celery_app import app
from .confine import ChildFailed, LimitExceeded, TaskLimits, run_confined
from .files import (
    MODEL_FORMAT_OF_KIND,
    clean_up,
    code_checkpoints,
    fetch_inputs,
    local_name,
    store_artifacts,
    take_over_work,
)
from .fleet_report import StageClock
from .shared_store import NoCheckpoints, checkpoints_for

log = logging.getLogger(__name__)
DB_RETRY: dict[str, Any] = {"autoretry_for": (OperationalError,), "retry_backoff": True, "max_retries": 8}
"""A database that is briefly away delays a task instead of losing it (the job stays QUEUED)."""


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
        _runtime = Runtime(settings, Database(settings.database_url), store_for(settings), os.getpid())
    return _runtime


# --- upload validation ----------------------------------------------------------------------


@app.task(name=VALIDATE_UPLOAD, **DB_RETRY)
def validate_upload(kind: str, upload_id: str) -> None:
    """Inspect one upload with the engine's loaders; record its summary or why it is invalid."""
    rt = runtime()
    table = UPLOAD_TABLES[kind]
    row = begin_validation(rt.db, table, upload_id, rt.settings.max_validation_attempts)
    if row is None:
        return
    with job_context(upload_id, row.team_id), validation_heartbeat(rt.db, table, upload_id,
                                                                     rt.settings.heartbeat_interval_s):  # fmt: skip
        summary, error = _inspect(rt, kind, upload_id, row)
        detected = None
        if error is None and isinstance(row, ModelUpload) and row.format == "auto" and summary:
            detected = summary.get("format") or MODEL_FORMAT_OF_KIND.get(summary.get("kind", ""))
        with rt.db.write() as s:
            finish_validation(s, table, upload_id, summary=summary, error=error, detected_format=detected)


def _inspect(rt: Runtime, kind: str, upload_id: str, row: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(summary, None) for a good upload, (None, problem) for a bad one."""
    rt.settings.work_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(dir=rt.settings.work_dir, prefix="validate-") as tmp:
        path = rt.store.fetch(row.sha256, Path(tmp) / local_name(kind, row.format, row.filename))
        options, code = dict(row.options or {}) if kind == "dataset" else {}, code_checkpoints(rt.settings)
        try:
            limits = TaskLimits.for_queue(rt.settings, "validate")
            summary = run_confined(
                lambda _: engine_calls.validate_upload(path, kind, row.format, options, code, limits.memory_bytes),
                limits=limits, scratch=Path(tmp), on_message=lambda _: None,
                classify=engine_calls.classify, name="validation")  # fmt: skip
            return summary, None
        except LimitExceeded as exc:
            return None, resource_problem(exc.which, exc.allowed, f"validating this {kind}")
        except ChildFailed as exc:
            if exc.kind == "input":
                return None, input_problem(exc.detail, exc.code)
            log.error("validating %s %s failed: %s", kind, upload_id, exc.detail)
            return None, internal_problem("validation")


# --- compression jobs ------------------------------------------------------------------------


@app.task(name=RUN_JOB, **DB_RETRY)
def run_job(job_id: str) -> None:
    rt = runtime()
    with job_context(job_id):
        job = begin(rt.db, job_id)
    if job is None:
        return
    with job_context(job_id, job.team_id):
        _run(rt, job)


def _run(rt: Runtime, job: Job) -> None:
    job_id, s = job.id, rt.settings
    fence = Fence(job_id, job.attempts)
    folder = Path(s.work_dir) / "jobs" / job_id  # type: ignore[arg-type]
    recorder = ProgressRecorder(rt.db, job_id, s.progress_interval_s, fence)
    cancel = CancelCheck(rt.db, job_id, s.cancel_poll_s, fence, stopping=shutdown.requested)
    heartbeat = Heartbeat(rt.db, job_id, s.heartbeat_interval_s, fence)
    outcome: JobState | None = None
    artifacts: list[Artifact] = []
    checkpoints = NoCheckpoints()
    clock = StageClock()  # seconds per stage, for /metrics

    def end(target: JobState, **changes: Any) -> JobState | None:
        recorder.flush()
        return finish(rt.db, rt.store, fence, target, **changes)

    try:
        recorder.log(f"attempt {job.attempts} started on {job.worker}")
        out, work, previous = take_over_work(folder, job.attempts)
        checkpoints = checkpoints_for(rt.store, job_id, job.attempts, fence, work, s.checkpoint_sync_s)
        previous = checkpoints.take_over(previous)  # with S3: from whichever host ran it last
        if previous is not None:
            recorder.log(f"continuing from the checkpoints of attempt {previous}")
        with clock.timed("fetch_inputs"):
            inputs = fetch_inputs(rt.db, rt.store, job, folder / "inputs")
        code = code_checkpoints(s)
        progress = checkpoints.wrap(clock.wrap(recorder))  # (each message, between the child's writes)
        heartbeat.start()
        started = time.perf_counter()
        result = run_confined(
            lambda channel: engine_calls.run_compress(channel, job.spec, inputs, out, work, code),
            limits=TaskLimits.for_queue(s, "jobs"), scratch=folder, on_message=lambda m: progress(SimpleNamespace(**m)),
            should_stop=cancel, classify=engine_calls.classify, name="job")  # fmt: skip
        engine_s = time.perf_counter() - started
        metrics = result["metrics"]
        if (step := _resumed_step(metrics)) is not None:
            recorder.log(f"resumed from step {step}", resumed_from_step=step)
        recorder.log(f"the engine finished in {engine_s:.2f} s; storing the results", engine_s=round(engine_s, 3))
        if owns(rt.db, fence):
            with clock.timed("store_results"):
                store_artifacts(rt.store, rt.settings, job, result["artifacts"], artifacts, fence, recorder.log)
            outcome = finish(rt.db, rt.store, fence, JobState.SUCCEEDED, metrics=metrics,
                             summary=metrics.get("summary"), stage="done", artifacts=artifacts,
                             files={a["name"]: Path(a["path"]) for a in result["artifacts"]},
                             events=recorder.take())  # every event before the final state's  # fmt: skip
    except LimitExceeded as exc:
        recorder.log(f"stopped: {exc}")
        outcome = end(JobState.FAILED, error=resource_problem(exc.which, exc.allowed, "this job"))
    except ChildFailed as exc:
        if exc.kind == "cancelled" and cancel.handing_back:
            checkpoints.final_sync()
            recorder.log("the worker is shutting down: the job is handed back and resumes from its last "
                         "checkpoint on the next worker")  # fmt: skip
        outcome = _failed(exc, cancel, end, job_id)
    except Exception as exc:
        if (full := storage_full(exc)) is not None:
            log.error("job %s: out of space: %s", job_id, full)
            outcome = end(JobState.FAILED, error=storage_problem(full.filename))
        elif database_unavailable(exc):  # hand the job back; the relay sends it again
            log.warning("job %s: the database is unavailable (%s); handing the job back", job_id, exc)
            outcome = end(JobState.QUEUED)
        elif isinstance(exc, StoreUnavailable):  # the same for the store (after store_retry_s)
            log.warning("job %s: %s; handing the job back", job_id, exc)
            recorder.log("the artifact store stayed unreachable; the job goes back to the queue")
            outcome = end(JobState.QUEUED)
        else:
            log.exception("job %s failed", job_id)
            outcome = end(JobState.FAILED, error=internal_problem("the job"))
    finally:
        recorder.close()
        heartbeat.done.set()
        if heartbeat.is_alive():
            heartbeat.join()
        checkpoints.close(ended=outcome in TERMINAL)
        if outcome is JobState.SUCCEEDED:
            clock.report(s, job.enqueued_at or job.created_at, job.started_at)
        clean_up(rt.db, rt.store, rt.settings, job, fence, folder, outcome, artifacts)
    log.info("job %s attempt %s: %s", job_id, job.attempts, outcome.value if outcome else "superseded")


def _failed(exc: ChildFailed, cancel: CancelCheck, end: Any, job_id: str) -> JobState | None:
    """The outcome of an engine run that ended with an error."""
    if exc.kind == "cancelled":
        # the worker is stopping: the job goes back to the queue, or it was cancelled
        return end(JobState.QUEUED if cancel.handing_back else JobState.CANCELLED)
    if exc.kind == "input":
        return end(JobState.FAILED, error=input_problem(exc.detail, exc.code))
    if exc.kind == "storage":
        log.error("job %s: %s", job_id, exc.detail)
        return end(JobState.FAILED, error=storage_problem())
    log.error("job %s failed: %s", job_id, exc.detail)
    return end(JobState.FAILED, error=internal_problem("the job"))


def _resumed_step(metrics: dict[str, Any]) -> int | None:
    train = (metrics.get("distillation") or {}).get("train") or {}
    step = (train.get("student") or {}).get("resumed_from_step")
    return step if isinstance(step, int) else None
