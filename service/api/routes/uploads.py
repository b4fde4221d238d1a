"""``/v1/models`` and ``/v1/datasets``: streamed uploads, listed, fetched, deleted.

Both resources behave the same way, so one factory builds both routers. An upload is
first checked as it stands (`service.api.inspection`: pickles, code checkpoints, unsafe archives,
lying headers are a 422 and nothing is stored), then stored and answered ``201`` in state
``validating``; a worker on the light ``validate`` queue inspects it with the engine and
records ``ready`` (with a summary) or ``invalid`` (with the reason).
"""

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Json,
    ValidationError,
    field_validator,
)
from sqlalchemy import select

from worker.compression.spec import DataSpec

from ...core.auth import Principal
from ...core.fairness import send_validation_fairly
from ...core.models import DatasetUpload, Job, ModelUpload, new_id
from ...core.queues import BrokerUnavailable
from ...core.quotas import check_storage, lock_team
from ...core.records import lock_blob, release_blob
from ...core.states import TERMINAL, UploadState
from ..deps import PROTECTED, Auth, Context, Ctx, blocking
from ..inspection import InspectionLimits, inspect_upload
from ..labels import ListFilters, Tags
from ..multipart import ReceivedUpload, receive_upload
from ..pagination import MAX_PAGE_SIZE, paginate
from ..problems import (
    AUTH_RESPONSES,
    ProblemError,
    not_found,
    reject_unstorable,
    responses,
    validation_problem,
)
from ..schemas import (
    DatasetOut,
    DatasetPage,
    ModelFormat,
    ModelOut,
    ModelPage,
)


class ModelForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=255)
    tags: Tags = Field(default_factory=list)
    """Labels to filter by: ``a,b`` or a JSON list."""
    format: ModelFormat = "auto"
    """``zoo_zip`` (config.json + model.safetensors), ``hf_zip`` (a transformers folder; both as a zip or a
    tar(.gz)), ``onnx``, ``torchscript`` / ``exported_program`` (only where the operator allows code
    checkpoints; they run in a sandbox), or ``auto``. Pickles are never accepted."""
    metadata: Json[dict[str, Any]] | None = None
    """A JSON object kept with the upload."""


class DatasetForm(DataSpec):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    tags: Tags = Field(default_factory=list)
    """Labels to filter by: ``a,b`` or a JSON list."""
    metadata: Json[dict[str, Any]] | None = None

    @field_validator("image_size", "image_mean", "image_std", "classes", "target_columns", "feature_columns",
                     "action_columns", "categorical_columns", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        """Form values are text: accept ``[32, 32]`` or ``32,32`` (``["setosa", "versicolor"]`` or
        ``setosa,versicolor``)."""
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
        options = DataSpec.model_validate(form.model_dump(exclude={"name", "metadata", "tags"}))
        return {"format": options.format, "options": options.model_dump(mode="json")}
    assert isinstance(form, ModelForm)
    return {"format": form.format}


def _inspect(ctx: Context, kind: Literal["model", "dataset"], fmt: str, received: ReceivedUpload) -> None:
    """The synchronous checks (see `service.api.inspection`) on the staged bytes, before anything is kept."""
    inspect_upload(kind, fmt, received.blob.staged_path(), InspectionLimits.of(ctx.settings))


def make_router(k: UploadKind) -> APIRouter:
    router = APIRouter(
        prefix=f"/v1/{k.plural}",
        tags=[k.plural],
        dependencies=PROTECTED,  # before any other check of the request
        responses=AUTH_RESPONSES,
    )
    name = k.kind
    Ident = Annotated[str, Path(alias=f"{name}_id")]
    item_path = "/{" + name + "_id}"

    def load(s: Any, ident: str, who: Principal) -> Any:
        row = s.get(k.table, ident)
        if row is None or not who.sees(row.team_id):
            raise not_found(name, ident)
        return row

    @router.post(
        "",
        status_code=201,
        response_model=k.out,
        summary=f"Upload a {name}",
        openapi_extra=_multipart_schema(k.form),
        responses=responses(400, 413, 415, 422, 429, 503),
        operation_id=f"create_{name}",
    )
    async def create(request: Request, response: Response, ctx: Ctx, who: Auth) -> Any:
        """An admin key uploads as its own team."""
        s = ctx.settings
        team = who.team_id
        received = await receive_upload(
            request,
            ctx.store,
            max_bytes=s.max_upload_bytes,
            max_field_bytes=s.max_form_field_bytes,
            max_parts=s.max_form_parts,
            max_part_header_bytes=s.max_part_header_bytes,
            drain_bytes=s.upload_drain_bytes,
        )
        try:
            try:
                form = k.form.model_validate(received.fields)
            except ValidationError as exc:
                raise validation_problem(exc, known=[*k.form.model_fields, "file"]) from None
            reject_unstorable(form.model_dump())
            values = _row_values(k, form)
            await anyio.to_thread.run_sync(_inspect, ctx, k.kind, values["format"], received)
            await anyio.to_thread.run_sync(_check_storage, ctx, team, received.blob.size)
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
            state=UploadState.VALIDATING.value,
            user_metadata=form.metadata or {},
            tags=form.tags,  # type: ignore[attr-defined]
            **values,
        )  # type: ignore[attr-defined]
        try:
            await anyio.to_thread.run_sync(_insert, ctx, row)
            await anyio.to_thread.run_sync(send_validation_fairly, ctx.db, ctx.queues, k.kind, row.id)
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
        who: Auth,
        filters: Annotated[ListFilters, Depends()],
        state: UploadState | None = None,
        page_size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
        page_token: str | None = Query(None, max_length=512),
    ) -> Any:
        """Newest first; filters combine (all must hold); an admin key lists every team's."""
        stmt = select(k.table)
        if not who.is_admin:
            stmt = stmt.where(k.table.team_id == who.team_id)
        if state is not None:
            stmt = stmt.where(k.table.state == state)
        stmt = filters.apply(stmt, k.table)
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
    def get(ident: Ident, ctx: Ctx, who: Auth) -> Any:
        with ctx.db.read() as s:
            return k.out.of(load(s, ident, who))

    @router.delete(
        item_path,
        status_code=204,
        summary=f"Delete a {name}",
        responses=responses(404, 409),
        operation_id=f"delete_{name}",
    )
    @blocking
    def delete(ident: Ident, ctx: Ctx, who: Auth) -> Response:
        column = Job.teacher_model_id if k.kind == "model" else Job.dataset_id
        with ctx.db.write() as s:
            row = load(s, ident, who)
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


def _check_storage(ctx: Context, team: str, size: int) -> None:
    """Before the blob is kept: a team over its storage quota stores nothing."""
    with ctx.db.read() as s:
        check_storage(s, ctx.settings, team, size)


def _insert(ctx: Context, row: Any) -> None:
    """Add the row under the team's quota lock and the blob's lock (see `release_blob`), then
    make sure a concurrent deletion of the same bytes did not take the file away meanwhile."""
    with ctx.db.write() as s:
        lock_team(s, row.team_id)
        check_storage(s, ctx.settings, row.team_id, row.size_bytes)
        lock_blob(s, row.sha256)
        s.add(row)
    if not ctx.store.exists(row.sha256):
        raise ProblemError(
            503,
            "the same file was being deleted (retention or a DELETE) as it arrived; nothing was stored, "
            "send it again",
            code="upload_conflict",
            headers={"Retry-After": "1"},
        )


def _delete(ctx: Context, table: Any, ident: str, sha256: str) -> None:
    with ctx.db.write() as s:
        row = s.get(table, ident)
        if row is not None:
            s.delete(row)
    release_blob(ctx.db, ctx.store, sha256)


models_router = make_router(MODELS)
datasets_router = make_router(DATASETS)
