"""A job's and an upload's files on a worker: the uploads fetched from the store under names whose
suffix tells the engine what they are, the engine's options for code checkpoints, and each
attempt's own folder (taking over an earlier attempt's checkpoints)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from service.core.db import Database
from service.core.lifecycle import Fence
from service.core.models import Artifact, DatasetUpload, Job, ModelUpload
from service.core.records import release_blob
from service.core.settings import Settings
from service.core.states import TERMINAL, JobState
from service.core.store import BlobStore
from worker.compression.errors import InputError

from .shared_store import store_retry

log = logging.getLogger(__name__)

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
    "onnx_zip": ".zip",
    "npz": ".npz",
    "safetensors": ".safetensors",
    "csv": ".csv",
    "text_csv": ".csv",
    "parquet": ".parquet",
    "jsonl": ".jsonl",
    "image_zip": ".zip",
    "audio_zip": ".zip",
}


def code_checkpoints(settings: Settings) -> dict[str, Any]:
    """The engine's options for TorchScript / ExportedProgram teachers: refused unless the operator
    set ``KDQ_ALLOW_CODE_CHECKPOINTS``, and then run only in a sandboxed child process."""
    from worker.compression.io.sandbox import (
        SandboxLimits,  # (imports torch: only once a task runs)
    )

    return {
        "allow_code": settings.allow_code_checkpoints,
        "sandbox": SandboxLimits(
            memory_bytes=settings.sandbox_memory_bytes, cpu_seconds=settings.sandbox_cpu_seconds
        ),
    }


def local_name(stem: str, fmt: str, filename: str | None) -> str:
    """A file name whose suffix tells the engine's format detection what the blob is."""
    suffix = SUFFIX.get(fmt) or (Path(filename).suffix.lower() if filename else "")
    return stem + suffix


def fetch_inputs(db: Database, store: BlobStore, job: Job, folder: Path) -> dict[str, Path | None]:
    with db.read() as s:
        teacher = s.get(ModelUpload, job.teacher_model_id)
        dataset = s.get(DatasetUpload, job.dataset_id)
        evalset = s.get(DatasetUpload, job.eval_dataset_id) if job.eval_dataset_id else None
    if teacher is None or dataset is None or (job.eval_dataset_id and evalset is None):
        raise InputError("an upload this job uses was deleted before the job started")
    paths: dict[str, Path | None] = {"eval_dataset_path": None}
    for key, row in (("teacher_path", teacher), ("dataset_path", dataset), ("eval_dataset_path", evalset)):
        if row is not None:
            stem = key.removesuffix("_path")
            paths[key] = store.fetch(row.sha256, folder / local_name(stem, row.format, row.filename))
    return paths


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


def clean_up(db: Database, store: BlobStore, settings: Settings, job: Job, fence: Fence, folder: Path,
             outcome: JobState | None, artifacts: list[Artifact]) -> None:  # fmt: skip
    """After an attempt: release what it stored if it did not succeed, and remove its folders
    unless another attempt needs their checkpoints."""
    if outcome is not JobState.SUCCEEDED and artifacts:  # stored, then cancelled, failed or superseded
        released = sum(release_blob(db, store, art.sha256) for art in artifacts)
        log.info("job %s: %d stored artifact(s) released, %d deleted", job.id, len(artifacts), released)
    if outcome in TERMINAL and not settings.job_tmp_keep:
        shutil.rmtree(folder, ignore_errors=True)
    elif fence.lost.is_set():  # superseded: only this attempt's own folder is ours to touch
        mine = folder / f"attempt-{job.attempts}"
        ended = fence.seen_state is None or JobState(fence.seen_state) in TERMINAL
        # its checkpoints stay for the attempt that takes the job over, unless the job is over
        shutil.rmtree(mine if ended else mine / "output", ignore_errors=True)
    # (otherwise the job was handed back, or its database stayed away: the checkpoints stay
    # for the next attempt, which the relay or the reaper starts)


def store_artifacts(store: BlobStore, settings: Settings, job: Job, produced: list[dict[str, Any]],
                    stored: list[Artifact], fence: Fence, note: Any) -> None:  # fmt: skip
    """Put each artifact's file in the store; ``stored`` collects the rows as they are made, so
    whatever was stored before a failure (a full disk) can be released. (One at a time: storing
    them in parallel measured no faster, 6.8 vs 6.5 ms for a job's six files; their fsyncs
    serialise on the file system's journal.) An unreachable store is retried for
    ``store_retry_s`` (`worker.shared_store.store_retry`)."""
    for art in produced:
        path = Path(art["path"])
        ref = store_retry(f"storing {art['name']}", lambda path=path: store.put_file(path),
                          settings.store_retry_s, fence, note)  # fmt: skip
        stored.append(Artifact(job_id=job.id, name=art["name"], team_id=job.team_id, kind=art["kind"],
                               sha256=ref.sha256, size_bytes=ref.size, description=art["description"]))  # fmt: skip
