"""Typed documents of the published schema (``openapi/openapi.json``): jobs, uploads, artifacts,
deliveries, problems.

They read defensively: unknown fields are kept (``extra="allow"``), and fields a newer or older
service may not send have defaults, so a client keeps working across a service upgrade. A job's
engine spec is read from ``spec`` or, when the service sends its fields flat, from the top level
(`Job.spec_fields`); its verdict from ``summary.verdict`` when there is one.

A `Job` or `Upload` fetched through a `kdq.Client` also acts: ``job.wait()``, ``job.cancel()``,
``job.artifacts.download(dir)``, ``job.rerun(...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
SPEC_KEYS = ("student", "distillation", "quantization", "evaluation", "data", "targets", "task")
"""Engine spec fields, for a service that sends them flat rather than under ``spec``."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    _client: Any = PrivateAttr(default=None)

    def bind(self, client: Any) -> Any:
        self._client = client
        return self

    def _api(self) -> Any:
        if self._client is None:
            raise RuntimeError("this document was not fetched through a kdq.Client")
        return self._client


class Problem(_Doc):
    title: str = ""
    status: int | None = None
    detail: str | None = None
    code: str | None = None
    errors: list[dict[str, Any]] | None = None


class Progress(_Doc):
    stage: str | None = None
    current: int = 0
    total: int = 0
    fraction: float = 0.0
    eta_s: float | None = None
    overall: float | None = None
    """Of the whole job, 0..1 (a service that does not send it: None)."""


class Artifact(_Doc):
    name: str
    kind: str = ""
    size_bytes: int = 0
    sha256: str
    description: str = ""
    url: str = ""


class Delivery(_Doc):
    id: str
    url: str
    event: str = ""
    state: str
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None


class Upload(_Doc):
    """A model or dataset upload (``kind`` is ``model`` or ``dataset``, from its id)."""

    id: str
    team_id: str | None = None
    name: str = ""
    tags: list[str] = Field(default_factory=list)
    format: str = ""
    filename: str | None = None
    sha256: str = ""
    size_bytes: int = 0
    state: str
    summary: dict[str, Any] | None = None
    error: Problem | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def kind(self) -> str:
        return "model" if self.id.startswith("mdl_") else "dataset"

    def delete(self) -> None:
        self._api().delete_upload(self.id)


class Job(_Doc):
    id: str
    team_id: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    state: str
    stage: str | None = None
    progress: Progress = Field(default_factory=Progress)
    queue: str | None = None
    teacher_model_id: str | None = None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    spec: dict[str, Any] | None = None
    attempts: int = 0
    error: Problem | None = None
    summary: dict[str, Any] | None = None
    notify: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deleted_at: datetime | None = None
    """Set once its files were deleted (`Job.delete`)."""

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    @property
    def verdict(self) -> dict[str, Any] | None:
        """``summary.verdict`` (ship / ship_with_caution / do_not_ship, with reasons) when given."""
        summary = self.summary or {}
        verdict = summary.get("verdict")
        if isinstance(verdict, str):  # the job document: summary.verdict beside summary.reasons and .headline
            return {"label": verdict, "reasons": list(summary.get("reasons") or []), "headline": summary.get("headline")}
        return verdict if isinstance(verdict, dict) else None

    def spec_fields(self) -> dict[str, Any]:
        """The engine spec it ran with, wherever the service put it."""
        if isinstance(self.spec, dict):
            return dict(self.spec)
        extra = self.model_extra or {}
        return {k: extra[k] for k in SPEC_KEYS if k in extra}

    def resubmittable(self) -> dict[str, Any]:
        """A body that submits this job again (change what you like, then ``Client.submit``): a deep
        copy, so changing one of its blocks leaves this document (and another such body) as it was."""
        body = copy.deepcopy(self.spec_fields())
        body.update(teacher_model_id=self.teacher_model_id, dataset_id=self.dataset_id)
        if self.eval_dataset_id:
            body["eval_dataset_id"] = self.eval_dataset_id
        if self.name:
            body["name"] = self.name
        if self.tags:
            body["tags"] = list(self.tags)
        return body

    # --- acting through the client that fetched it ------------------------------------------

    def refresh(self) -> Job:
        return self._api().job(self.id)

    def wait(self, progress: bool | Any = False, *, raise_on_failure: bool = True,
             timeout: float | None = None) -> Job:  # fmt: skip
        """Follow the job's event stream until it ends (a live bar on stderr with ``progress``);
        the final document. A failed or cancelled job raises `kdq.JobFailed` (exit status 1)."""
        return self._api().wait(self.id, progress=progress, raise_on_failure=raise_on_failure, timeout=timeout)

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self._api().events(self.id)

    def cancel(self) -> Job:
        return self._api().cancel(self.id)

    def delete(self) -> Job:
        """Delete the finished job's files (the job stays, as a record)."""
        return self._api().delete_job(self.id)

    def metrics(self) -> dict[str, Any]:
        return self._api().metrics(self.id)

    def deliveries(self) -> list[Delivery]:
        return self._api().deliveries(self.id)

    def rerun(self, **changes: Any) -> Job:
        """Submit this job again with ``changes`` (top-level fields; dicts are merged one level, except
        that a new ``quantization.method`` or ``student.kind`` starts that block afresh)."""
        body = self.resubmittable()
        for key, value in changes.items():
            merge_change(body, key, value)
        return self._api().submit(body)

    @property
    def artifacts(self) -> Artifacts:
        return Artifacts(self._api(), self.id)


class Artifacts:
    """A job's files: ``list()``, and ``download(dir)`` checked against each sha256."""

    def __init__(self, client: Any, job_id: str) -> None:
        self.client, self.job_id = client, job_id

    def list(self) -> list[Artifact]:
        return self.client.artifacts(self.job_id)

    def download(self, folder: str | Path, names: list[str] | None = None) -> list[Path]:
        return self.client.download(self.job_id, Path(folder), names=names)

    def __iter__(self) -> Iterator[Artifact]:
        return iter(self.list())


class Me(_Doc):
    team_id: str
    scope: str = "team"
    auth: str = "keys"
    usage: dict[str, Any] = Field(default_factory=dict)
    """stored_bytes / max_stored_bytes, unfinished_jobs / max_unfinished_jobs, job_time_budget_s …"""


class WebhookSecret(_Doc):
    version: int
    rotated_at: datetime | None = None
    secret: str | None = None
    previous_valid_until: datetime | None = None


UNIONS = {"quantization": "method", "student": "kind"}
"""Spec blocks that are unions keyed by a field: each method or kind takes only its own fields."""


def merge_change(body: dict[str, Any], key: str, value: Any) -> None:
    """``body[key]`` changed by ``value``: a dict is merged into the old one, unless it names another
    method / kind of a union block (`UNIONS`), whose old fields belong to the old one
    (``calibration`` is a ``static_int8`` field: a rerun as ``dynamic_int8`` must not carry it)."""
    old = body.get(key)
    if not (isinstance(value, dict) and isinstance(old, dict)):
        body[key] = value
        return
    tag = UNIONS.get(key)
    switched = tag is not None and tag in value and value[tag] != old.get(tag)
    body[key] = dict(value) if switched else {**old, **value}


def switch_union(body: dict[str, Any], dotted: str, old: dict[str, Any]) -> None:
    """After ``--set quantization.method=…`` (or ``student.kind``): drop the fields of the old method."""
    key, _, leaf = dotted.partition(".")
    tag = UNIONS.get(key)
    before = old.get(key) if isinstance(old.get(key), dict) else {}
    if tag and leaf == tag and isinstance(body.get(key), dict) and body[key].get(tag) != before.get(tag):
        body[key] = {tag: body[key][tag], **{k: v for k, v in body[key].items() if k not in before}}

