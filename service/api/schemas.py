"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from worker.compression.spec import CompressSpec

from ..core.models import Artifact, DatasetUpload, Job, ModelUpload
from ..core.progress import overall, plan_of
from ..core.states import JobState, UploadState
from .labels import Name, Tags
from .problems import Problem

ModelFormat = Literal["auto", "zoo_zip", "hf_zip", "onnx", "onnx_zip", "torchscript", "exported_program"]
"""``onnx_zip``: a zip of one ``.onnx`` graph and its external data files (torch's default export writes
``model.onnx`` + ``model.onnx.data``)."""


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, use_attribute_docstrings=True)


class ModelOut(_Out):
    id: str
    team_id: str
    """The owning team (an admin key lists every team's)."""
    name: str
    tags: list[str]
    format: str
    """As given at upload; once validated, the detected format when ``auto`` was given."""
    filename: str | None
    sha256: str
    size_bytes: int
    state: UploadState
    summary: dict[str, Any] | None = Field(
        description="kind, task, input_kind, input_shape, output_dim, num_parameters, size_bytes (once ready)"
    )
    error: Problem | None = Field(description="why the upload is invalid")
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: ModelUpload) -> ModelOut:
        return cls.model_validate({**_columns(row), "metadata": row.user_metadata})


class DatasetOut(ModelOut):
    options: dict[str, Any] = Field(description="how the file is read (the data spec fields given at upload)")
    summary: dict[str, Any] | None = Field(
        description="samples, input_kind, inputs (shapes or columns), labelled, classes (once ready)"
    )

    @classmethod
    def of(cls, row: DatasetUpload) -> DatasetOut:  # type: ignore[override]
        return cls.model_validate({**_columns(row), "metadata": row.user_metadata})


class Page(BaseModel):
    next_page_token: str | None = Field(description="pass as page_token for the next page; null on the last")


class ModelPage(Page):
    items: list[ModelOut]


class DatasetPage(Page):
    items: list[DatasetOut]


UPLOAD_FIELDS = frozenset({"teacher_model_id", "dataset_id", "eval_dataset_id"})


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str = Field(min_length=1, max_length=2048)
    """An http(s) URL that receives the job document when the job ends (POST, signed with the
    team's webhook secret: ``POST /v1/webhooks/secret``)."""


JOB_LABELS = {"name", "tags", "notify"}
"""JobCreate's fields that are not the engine's spec (kept in their own columns)."""


class JobCreate(CompressSpec):
    """A compression job: the uploads to use and the engine spec, in one flat object. A job's
    document (`JobOut`) carries the same fields the same way, so a job read back can be sent
    again as it is, or with changes."""

    teacher_model_id: str = Field(max_length=40)
    dataset_id: str = Field(max_length=40)
    eval_dataset_id: str | None = Field(default=None, max_length=40)
    """A separate evaluation set (default: a seeded hold-out of ``dataset_id``)."""
    name: Name | None = None
    """A name to find the job by (lists filter by its prefix)."""
    tags: Tags = Field(default_factory=list)
    """Labels to filter by (``a,b`` or a list; 20 at most)."""
    notify: Notify | None = None
    """Where to send the job document when the job ends (a webhook)."""

    def spec_json(self) -> dict[str, Any]:
        """The engine's part (what the worker runs), as JSON."""
        return self.model_dump(mode="json", exclude=set(UPLOAD_FIELDS) | JOB_LABELS)


class ProgressOut(BaseModel):
    stage: str | None
    current: int
    total: int
    fraction: float = Field(description="of the current stage, 0..1")
    eta_s: float | None
    overall: float | None = Field(default=None, description="of the whole job, 0..1 (from its stages' usual shares)")


class JobOut(JobCreate):
    """A job: its request's fields (uploads and spec, as they run: the dataset's reading options
    merged in, defaults filled) and its state."""

    id: str
    team_id: str
    """The owning team (an admin key lists every team's)."""
    state: JobState
    stage: str | None
    progress: ProgressOut
    queue: str
    attempts: int
    error: Problem | None
    summary: dict[str, Any] | None = Field(description="headline metrics and the verdict once the job finished")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deleted_at: datetime | None = None
    """Set once the job's files were deleted (``DELETE /v1/jobs/{id}``): the job remains, as a record."""


def job_document(job: Job | Row[Any]) -> dict[str, Any]:
    """A job as the API shows it (the `JobOut` schema), from an ORM row or a Core row of the same
    columns. The stored spec was validated when the job was submitted: it is not validated again."""
    total = job.progress_total or 0
    fraction = 0.0 if total <= 0 else min(1.0, job.progress_step / total)
    done = 1.0 if job.state == JobState.SUCCEEDED else overall(plan_of(job.spec), job.stage, fraction)
    return {
        "id": job.id,
        "team_id": job.team_id,
        "name": job.name,
        "tags": list(job.tags or []),
        "notify": job.notify,
        "state": job.state,
        "stage": job.stage,
        "progress": {"stage": job.stage, "current": job.progress_step, "total": total, "fraction": fraction,
                     "eta_s": job.eta_s, "overall": done},  # fmt: skip
        "queue": job.queue,
        "teacher_model_id": job.teacher_model_id,
        "dataset_id": job.dataset_id,
        "eval_dataset_id": job.eval_dataset_id,
        **job.spec,
        "attempts": job.attempts,
        "error": job.error,
        "summary": job.summary,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "deleted_at": _iso(getattr(job, "deleted_at", None)),
    }


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


class JobPage(Page):
    items: list[JobOut]


class ArtifactOut(_Out):
    name: str
    kind: str
    size_bytes: int
    sha256: str
    description: str
    url: str

    @classmethod
    def of(cls, row: Artifact) -> ArtifactOut:
        return cls.model_validate({**_columns(row), "url": f"/v1/jobs/{row.job_id}/artifacts/{row.name}"})


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class Health(BaseModel):
    status: Literal["ok", "ready", "degraded", "unavailable"]
    """``degraded``: the API, database and broker answer, but a supervised part is restarting."""
    checks: dict[str, str] = Field(default_factory=dict)
    parts: dict[str, str] = Field(default_factory=dict)
    """Under ``kdq serve``: each supervised child (postgres, redis, the workers) and its state."""


def _columns(row: Any) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__mapper__.column_attrs}
