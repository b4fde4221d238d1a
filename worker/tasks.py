"""Celery tasks: thin adapters between a row and one engine call.

`validate_upload` inspects one upload with the engine's loaders; `run_job` runs one job through
`compress()` with a progress recorder, a cancel check and a heartbeat, then stores the artifacts.
Every state change and its rules live in `service.core.lifecycle`; files in `worker.files`.

The engine is imported inside the tasks (it imports torch), so importing this module, as the
worker does at start, stays light.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
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
    jsonable,
    storage_full,
    storage_problem,
)
from service.core.progress import ProgressRecorder
from service.core.queues import RUN_JOB, VALIDATE_UPLOAD
from service.core.records import UPLOAD_TABLES, release_blob
from service.core.settings import Settings, get_settings
from service.core.states import TERMINAL, JobState, UploadState, finish_validation
from service.core.store import BlobStore, StoreUnavailable
from service.core.stores import store_for
from worker.compression.errors import Cancelled, InputError
from worker.compression.spec import CompressSpec, DataSpec

from . import shutdown
from .celery_app import app
from .files import (
    MODEL_FORMAT_OF_KIND,
    code_checkpoints,
    fetch_inputs,
    local_name,
    take_over_work,
)
from .fleet_report import StageClock
from .shared_store import NoCheckpoints, checkpoints_for, store_retry

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
    with rt.db.read() as s:
        row = s.get(table, upload_id)
    if row is None or row.state != UploadState.VALIDATING:
        return
    with job_context(upload_id, row.team_id):
        summary, error = _inspect(rt, kind, upload_id, row)
        with rt.db.write() as s:
            if error is None and isinstance(row, ModelUpload) and row.format == "auto" and summary:
                detected = MODEL_FORMAT_OF_KIND.get(summary.get("kind", ""))
            else:
                detected = None
            finish_validation(s, table, upload_id, summary=jsonable(summary), error=error, detected_format=detected)


def _inspect(rt: Runtime, kind: str, upload_id: str, row: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(summary, None) for a good upload, (None, problem) for a bad one."""
    from worker.compression.io.validate import validate_dataset, validate_model

    rt.settings.work_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(dir=rt.settings.work_dir, prefix="validate-") as tmp:
        path = rt.store.fetch(row.sha256, Path(tmp) / local_name(kind, row.format, row.filename))
        try:
            if isinstance(row, ModelUpload):
                return validate_model(path, row.format, **code_checkpoints(rt.settings)), None
            return validate_dataset(path, DataSpec.model_validate(row.options)), None
        except InputError as exc:
            return None, input_problem(exc)
        except Exception:
            log.exception("validating %s %s failed", kind, upload_id)
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
    from worker.compression.compress import compress

    job_id, s = job.id, rt.settings
    fence = Fence(job_id, job.attempts)
    folder = Path(s.work_dir) / "jobs" / job_id  # type: ignore[arg-type]
    recorder = ProgressRecorder(rt.db, job_id, s.progress_interval_s, fence)
    cancel = CancelCheck(rt.db, job_id, s.cancel_poll_s, fence, stopping=shutdown.requested)
    heartbeat = Heartbeat(rt.db, job_id, s.heartbeat_interval_s, fence)
    heartbeat.start()
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
        started, progress = time.perf_counter(), checkpoints.wrap(clock.wrap(recorder))
        result = compress(CompressSpec.model_validate(job.spec), **inputs, output_dir=out, progress=progress,
                          cancel=cancel, checkpoint_dir=work, **code_checkpoints(s))  # fmt: skip
        engine_s = time.perf_counter() - started
        metrics = jsonable(result.metrics)
        if (step := _resumed_step(metrics)) is not None:
            recorder.log(f"resumed from step {step}", resumed_from_step=step)
        recorder.log(f"the engine finished in {engine_s:.2f} s; storing the results", engine_s=round(engine_s, 3))
        if owns(rt.db, fence):
            with clock.timed("store_results"):
                _store_artifacts(rt, job, result, artifacts, fence, recorder.log)
            outcome = finish(rt.db, rt.store, fence, JobState.SUCCEEDED, metrics=metrics,
                             summary=metrics.get("summary"), stage="done", artifacts=artifacts,
                             files={a.name: Path(a.path) for a in result.artifacts},
                             events=recorder.take())  # every event before the final state's  # fmt: skip
    except Cancelled:
        if cancel.handing_back:  # the worker is stopping: the job goes back to the queue
            checkpoints.final_sync()
            recorder.log("the worker is shutting down: the job is handed back and resumes from its "
                         "last checkpoint on the next worker")  # fmt: skip
            outcome = end(JobState.QUEUED)
        else:
            outcome = end(JobState.CANCELLED)
    except InputError as exc:
        outcome = end(JobState.FAILED, error=input_problem(exc))
    except Exception as exc:
        if (full := storage_full(exc)) is not None:
            log.error("job %s: out of space: %s", job_id, full)
            outcome = end(JobState.FAILED, error=storage_problem(full))
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
        heartbeat.join()
        checkpoints.close(ended=outcome in TERMINAL)
        if outcome is JobState.SUCCEEDED:
            clock.report(s, job.enqueued_at or job.created_at, job.started_at)
        _clean_up(rt, job, fence, folder, outcome, artifacts)
    log.info("job %s attempt %s: %s", job_id, job.attempts, outcome.value if outcome else "superseded")


def _clean_up(rt: Runtime, job: Job, fence: Fence, folder: Path, outcome: JobState | None,
              artifacts: list[Artifact]) -> None:  # fmt: skip
    if outcome is not JobState.SUCCEEDED and artifacts:  # stored, then cancelled, failed or superseded
        released = sum(release_blob(rt.db, rt.store, art.sha256) for art in artifacts)
        log.info("job %s: %d stored artifact(s) released, %d deleted", job.id, len(artifacts), released)
    if outcome in TERMINAL and not rt.settings.job_tmp_keep:
        shutil.rmtree(folder, ignore_errors=True)
    elif fence.lost.is_set():  # superseded: only this attempt's own folder is ours to touch
        mine = folder / f"attempt-{job.attempts}"
        ended = fence.seen_state is None or JobState(fence.seen_state) in TERMINAL
        # its checkpoints stay for the attempt that takes the job over, unless the job is over
        shutil.rmtree(mine if ended else mine / "output", ignore_errors=True)
    # (otherwise the job was handed back, or its database stayed away: the checkpoints stay
    # for the next attempt, which the relay or the reaper starts)


def _store_artifacts(rt: Runtime, job: Job, result: Any, stored: list[Artifact], fence: Fence,
                     note: Any) -> None:  # fmt: skip
    """Put each artifact's file in the store; ``stored`` collects the rows as they are made, so
    whatever was stored before a failure (a full disk) can be released. (One at a time: storing
    them in parallel measured no faster, 6.8 vs 6.5 ms for a job's six files; their fsyncs
    serialise on the file system's journal.) An unreachable store is retried for
    ``store_retry_s`` (`worker.shared_store.store_retry`)."""
    for art in result.artifacts:
        path = Path(art.path)
        ref = store_retry(f"storing {art.name}", lambda path=path: rt.store.put_file(path),
                          rt.settings.store_retry_s, fence, note)  # fmt: skip
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


def _resumed_step(metrics: dict[str, Any]) -> int | None:
    train = (metrics.get("distillation") or {}).get("train") or {}
    step = (train.get("student") or {}).get("resumed_from_step")
    return step if isinstance(step, int) else None
