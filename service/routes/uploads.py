"""``/v1/models`` and ``/v1/datasets``: streamed uploads, listed, fetched, deleted.

Both resources behave the same way, so one factory builds both routers. An upload is
stored and answered ``201`` in state ``validating``; a worker on the light ``validate``
queue inspects it with the engine and records ``ready`` (with a summary) or ``invalid``
(with the reason).
"""

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator
from sqlalchemy import select

from worker.compression.spec import DataSpec

from ..deps import Context, Ctx, Team, blocking
from ..models import DatasetUpload, Job, ModelUpload, new_id
from ..pagination import MAX_PAGE_SIZE, paginate
from ..problems import ProblemError, not_found, responses, validation_problem
from ..queueing import BrokerUnavailable
from ..records import release_blob
from ..schemas import DatasetOut, DatasetPage, ModelFormat, ModelOut, ModelPage, UploadState
from ..states import TERMINAL
from ..uploads import receive_upload

ZIP_MAGIC = (b"PK\x03\x04",)
MAGIC: dict[str, tuple[bytes, ...]] = {
    "zoo_zip": ZIP_MAGIC,
    "hf_zip": ZIP_MAGIC,
    "npz": ZIP_MAGIC,
    "image_zip": ZIP_MAGIC,
    "parquet": (b"PAR1",),
}
"""Formats whose files open with a known signature, checked before anything is stored."""


class ModelForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=255)
    format: ModelFormat = "auto"
    """``zoo_zip`` (config.json + model.safetensors), ``hf_zip`` (a transformers folder), ``onnx``, or ``auto``."""
    metadata: Json[dict[str, Any]] | None = None
    """A JSON object kept with the upload."""


class DatasetForm(DataSpec):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    metadata: Json[dict[str, Any]] | None = None

    @field_validator("image_size", "image_mean", "image_std", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        """Form values are text: accept ``[32, 32]`` or ``32,32``."""
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [p.strip() for p in value.split(",")]
        return value


@dataclass(frozen=True)
class UploadKind:
    kind: Literal["model", "dataset"]
    plural: str
    table: type[ModelUpload | DatasetUpload]
    form: type[BaseModel]
    out: type[ModelOut]
    page: type[BaseModel]
    id_prefix: str


MODELS = UploadKind("model", "models", ModelUpload, ModelForm, ModelOut, ModelPage, "mdl")
DATASETS = UploadKind("dataset", "datasets", DatasetUpload, DatasetForm, DatasetOut, DatasetPage, "ds")


def _multipart_schema(form: type[BaseModel]) -> dict[str, Any]:
    schema = form.model_json_schema()
    props = {
        "file": {"type": "string", "format": "binary", "description": "the file"},
        **schema["properties"],
    }
    body = {"type": "object", "properties": props, "required": ["file"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


def _row_values(k: UploadKind, form: BaseModel) -> dict[str, Any]:
    if isinstance(form, DatasetForm):
        options = DataSpec.model_validate(form.model_dump(exclude={"name", "metadata"}))
        return {"format": options.format, "options": options.model_dump(mode="json")}
    assert isinstance(form, ModelForm)
    return {"format": form.format}


def _check_magic(fmt: str, head: bytes) -> None:
    magic = MAGIC.get(fmt)
    if magic and not head.startswith(magic):
        raise ProblemError(
            415,
            f"the file does not look like {fmt!r} (it lacks the {magic[0]!r} signature)",
            code="unsupported_media_type",
        )


def make_router(k: UploadKind) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{k.plural}", tags=[k.plural])
    name = k.kind
    Ident = Annotated[str, Path(alias=f"{name}_id")]
    item_path = "/{" + name + "_id}"

    def load(s: Any, ident: str, team: str) -> Any:
        row = s.get(k.table, ident)
        if row is None or row.team_id != team:
            raise not_found(name, ident)
        return row

    @router.post(
        "",
        status_code=201,
        response_model=k.out,
        summary=f"Upload a {name}",
        openapi_extra=_multipart_schema(k.form),
        responses=responses(400, 413, 415, 422, 503),
        operation_id=f"create_{name}",
    )
    async def create(request: Request, response: Response, ctx: Ctx, team: Team) -> Any:
        s = ctx.settings
        received = await receive_upload(
            request,
            ctx.store,
            max_bytes=s.max_upload_bytes,
            max_field_bytes=s.max_form_field_bytes,
            drain_bytes=s.upload_drain_bytes,
        )
        try:
            try:
                form = k.form.model_validate(received.fields)
            except ValidationError as exc:
                raise validation_problem(exc) from None
            values = _row_values(k, form)
            _check_magic(values["format"], received.blob.head())
            ref = await anyio.to_thread.run_sync(received.blob.commit)
        except BaseException:
            received.blob.abort()  # a no-op once committed
            raise
        row = k.table(
            id=new_id(k.id_prefix),
            team_id=team,
            name=form.name or received.filename or name,  # type: ignore[attr-defined]
            filename=received.filename,
            sha256=ref.sha256,
            size_bytes=ref.size,
            state="validating",
            user_metadata=form.metadata or {},
            **values,
        )  # type: ignore[attr-defined]
        try:
            await anyio.to_thread.run_sync(_insert, ctx, row)
            await anyio.to_thread.run_sync(ctx.queues.send_validation, k.kind, row.id)
        except BaseException as exc:  # undo: nothing stays stored for a failed request
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_delete, ctx, k.table, row.id, ref.sha256)
            if isinstance(exc, BrokerUnavailable):
                raise ProblemError(
                    503,
                    "the work queue is unavailable; nothing was stored, try again later",
                    code="broker_unavailable",
                ) from None
            raise
        ctx.metrics.uploaded_bytes.labels(k.kind).inc(ref.size)
        response.headers["Location"] = f"/v1/{k.plural}/{row.id}"
        return k.out.of(row)

    @router.get(
        "",
        response_model=k.page,
        summary=f"List {k.plural}",
        responses=responses(422),
        operation_id=f"list_{k.plural}",
    )
    @blocking
    def list_(
        ctx: Ctx,
        team: Team,
        state: UploadState | None = None,
        page_size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
        page_token: str | None = Query(None, max_length=512),
    ) -> Any:
        stmt = select(k.table).where(k.table.team_id == team)
        if state is not None:
            stmt = stmt.where(k.table.state == state)
        with ctx.db.read() as s:
            rows, token = paginate(s, stmt, k.table, page_size, page_token)
            return k.page(items=[k.out.of(r) for r in rows], next_page_token=token)

    @router.get(
        item_path,
        response_model=k.out,
        summary=f"Get a {name}",
        responses=responses(404),
        operation_id=f"get_{name}",
    )
    @blocking
    def get(ident: Ident, ctx: Ctx, team: Team) -> Any:
        with ctx.db.read() as s:
            return k.out.of(load(s, ident, team))

    @router.delete(
        item_path,
        status_code=204,
        summary=f"Delete a {name}",
        responses=responses(404, 409),
        operation_id=f"delete_{name}",
    )
    @blocking
    def delete(ident: Ident, ctx: Ctx, team: Team) -> Response:
        column = Job.teacher_model_id if k.kind == "model" else Job.dataset_id
        with ctx.db.write() as s:
            row = load(s, ident, team)
            refs = [column == ident] + ([Job.eval_dataset_id == ident] if k.kind == "dataset" else [])
            for ref in refs:
                busy = s.scalars(
                    select(Job.id).where(ref, Job.state.not_in([t.value for t in TERMINAL])).limit(1)
                )
                if (job_id := busy.first()) is not None:
                    raise ProblemError(
                        409, f"job {job_id} still uses this {name}; cancel it or wait", code="in_use"
                    )
            sha = row.sha256
            s.delete(row)
        release_blob(ctx.db, ctx.store, sha)
        return Response(status_code=204)

    return router


def _insert(ctx: Context, row: Any) -> None:
    with ctx.db.write() as s:
        s.add(row)


def _delete(ctx: Context, table: Any, ident: str, sha256: str) -> None:
    with ctx.db.write() as s:
        row = s.get(table, ident)
        if row is not None:
            s.delete(row)
    release_blob(ctx.db, ctx.store, sha256)


models_router = make_router(MODELS)
datasets_router = make_router(DATASETS)
