"""``/v1/jobs``: submit (idempotent), read, list, cancel, follow."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.compression.spec import DataSpec

from ...core.auth import Principal
from ...core.deletion import JobNotFinished, delete_artifacts
from ...core.lifecycle import JobFinished, request_cancel
from ...core.models import DatasetUpload, IdempotencyKey, Job, ModelUpload, new_id
from ...core.quotas import check_submission, lock_team, time_budget_for
from ...core.relay import enqueue
from ...core.routing import job_queue
from ...core.states import (
    TERMINAL,
    JobNotFound,
    JobState,
    UploadState,
    lock_job,
)
from ..costs import cost_errors
from ..deps import PROTECTED, Auth, Context, Ctx, blocking, db_threads
from ..jobcheck import check_job
from ..labels import JobFilters
from ..notify import job_labels
from ..pagination import MAX_PAGE_SIZE, paginate
from ..problems import (
    AUTH_RESPONSES,
    FieldError,
    ProblemError,
    not_found,
    reject_unstorable,
    responses,
    unprocessable,
)
from ..schemas import JobCreate, JobOut, JobPage, job_document
from ..sse import event_stream, has_more_events

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], dependencies=PROTECTED, responses=AUTH_RESPONSES
)
JOB_READ = select(*[c for c in Job.__table__.c if c.key != "metrics"])
JOB_BY_ID = JOB_READ.where(Job.id == bindparam("job_id"))
"""Built once: building the statement and its cache key per request costs as much as the query."""
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, min_length=1)]


async def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ProblemError(415, "send the job spec as application/json", code="unsupported_media_type")


def load_job(s: Session, ident: str, who: Principal) -> Job:
    job = s.get(Job, ident)
    if job is None or not who.sees(job.team_id):
        raise not_found("job", ident)
    return job


def _ready_upload(
    s: Session, table: type[ModelUpload | DatasetUpload], ident: str, team: str, pointer: str
) -> ModelUpload | DatasetUpload:
    row = s.get(table, ident)
    what = "model" if table is ModelUpload else "dataset"
    if row is None or row.team_id != team:
        raise unprocessable([FieldError(pointer=pointer, detail=f"{what} {ident!r} does not exist")])
    if row.state != UploadState.READY:
        reason = f": {row.error.get('detail')}" if row.state == UploadState.INVALID and row.error else ""
        raise unprocessable(
            [
                FieldError(
                    pointer=pointer,
                    detail=f"{what} {ident!r} is {row.state}{reason}; only ready uploads can be used",
                )
            ]
        )
    return row


def effective_spec(req: JobCreate, dataset: DatasetUpload, budget_s: float,
                   teacher: dict[str, Any] | None = None) -> JobCreate:  # fmt: skip
    """The request as it will run (validated once, by the route; only changed here): the dataset's
    reading options, overridden by what the job sets; what the teacher decides when neither said
    (grayscale or RGB images, the longest token sequence it reads); and the team's time budget
    where the spec asks for more or gives none."""
    data = {**dataset.options, **req.data.model_dump(mode="json", exclude_unset=True)}
    teacher = teacher or {}
    shape = teacher.get("input_shape") or []
    if teacher.get("input_kind") == "image" and len(shape) == 3 and data.get("grayscale") is None:
        data["grayscale"] = shape[0] == 1
    if teacher.get("input_kind") == "tokens" and shape and "max_length" not in data:
        data["max_length"] = min(DataSpec.model_fields["max_length"].default, int(shape[0]))
    distil = req.distillation
    if distil.time_budget_s is None or distil.time_budget_s > budget_s:
        distil = distil.model_copy(update={"time_budget_s": budget_s})
    update: dict[str, Any] = {"data": DataSpec.model_validate(data), "distillation": distil}
    if req.targets is not None and req.targets.time_budget_s > budget_s:
        update["targets"] = req.targets.model_copy(update={"time_budget_s": budget_s})
    return req.model_copy(update=update)


def job_json(job: Job | Any) -> bytes:
    return json.dumps(job_document(job), separators=(",", ":")).encode()


def _request_sha256(req: JobCreate) -> str:
    canonical = json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(s: Session, team: str, key: str, digest: str) -> Job | None:
    """The job an earlier request with this key created, or None; 422 when the body differs."""
    row = s.get(IdempotencyKey, (team, key))
    if row is None:
        return None
    if row.request_sha256 != digest:
        raise unprocessable(
            [
                FieldError(
                    parameter="Idempotency-Key",
                    detail="this key was already used with a different request body",
                )
            ]
        )
    return s.get(Job, row.job_id)


def _accepted(job: Job) -> Response:
    return Response(job_json(job), status_code=202, media_type="application/json",
                    headers={"Location": f"/v1/jobs/{job.id}"})  # fmt: skip


def _checked(
    ctx: Context, req: JobCreate, team: str
) -> tuple[JobCreate, ModelUpload, DatasetUpload, DatasetUpload | None]:
    """The spec as it will run and its uploads, or a 422 naming every field that does not fit."""
    with ctx.db.read() as s:
        teacher = _ready_upload(s, ModelUpload, req.teacher_model_id, team, "#/teacher_model_id")
        dataset = _ready_upload(s, DatasetUpload, req.dataset_id, team, "#/dataset_id")
        evalset = (
            _ready_upload(s, DatasetUpload, req.eval_dataset_id, team, "#/eval_dataset_id")
            if req.eval_dataset_id
            else None
        )
        budget_s = time_budget_for(s, ctx.settings, team)
    assert isinstance(teacher, ModelUpload) and isinstance(dataset, DatasetUpload)
    assert evalset is None or isinstance(evalset, DatasetUpload)
    spec = effective_spec(req, dataset, budget_s, teacher.summary or {})
    errors = check_job(
        spec, teacher.summary or {}, dataset.summary or {}, evalset.summary if evalset else None
    )
    errors += cost_errors(spec, teacher.summary or {}, dataset.summary or {}, ctx.settings)
    if evalset is not None and evalset.format != dataset.format:
        errors.append(
            FieldError(
                pointer="#/eval_dataset_id",
                detail=f"the evaluation set is {evalset.format} but the dataset is {dataset.format}; "
                "both are read with one data spec",
            )
        )
    if errors:
        raise unprocessable(errors, "the job cannot run with these uploads and options")
    return spec, teacher, dataset, evalset


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a compression job",
    dependencies=[Depends(require_json)],
    responses=responses(400, 413, 415, 422, 429, 503),
    operation_id="create_job",
)
@blocking
def create_job(req: JobCreate, ctx: Ctx, who: Auth, idempotency_key: IdempotencyHeader = None) -> Response:
    """The job belongs to the key's team (an admin key's own team), and so must its uploads."""
    team = who.team_id
    reject_unstorable(req.model_dump())
    digest = _request_sha256(req)
    if idempotency_key is not None:
        with ctx.db.read() as s:
            if (earlier := _replay(s, team, idempotency_key, digest)) is not None:
                return _accepted(earlier)

    spec, teacher, dataset, evalset = _checked(ctx, req, team)
    queue = job_queue(ctx.settings, spec, teacher.summary, dataset.summary)  # cuda (or big auto) → gpu
    job = Job(
        id=new_id("job"),
        team_id=team,
        state=JobState.QUEUED.value,
        queue=queue,
        spec=spec.spec_json(),
        teacher_model_id=teacher.id,
        dataset_id=dataset.id,
        eval_dataset_id=evalset.id if evalset else None,
        **job_labels(ctx, req, team),
    )
    try:
        with ctx.db.write() as s:
            lock_team(s, team)
            check_submission(s, ctx.settings, team)
            s.add(job)
            if idempotency_key is not None:
                s.flush()
                s.add(IdempotencyKey(team_id=team, key=idempotency_key, request_sha256=digest, job_id=job.id))
    except IntegrityError:  # a concurrent request with the same key won
        with ctx.db.read() as s:
            if idempotency_key is not None and (earlier := _replay(s, team, idempotency_key, digest)):
                return _accepted(earlier)
        raise
    # The outbox (`service.core.relay`): the row is committed before the message is sent, so from here
    # on no crash and no broker outage loses the job. If the broker refuses the message, the job
    # stays QUEUED without its outbox mark and the relay sends it once the broker is back; the
    # answer is still 202, because the job exists and will run. A 503 here would tell the client
    # "not created" about a job that was, and its retry would submit a duplicate.
    enqueue(ctx.db, ctx.queues, job.id, queue)
    return _accepted(job)


@router.get(
    "", response_model=JobPage, summary="List jobs", responses=responses(422), operation_id="list_jobs"
)
@blocking
def list_jobs(
    ctx: Ctx,
    who: Auth,
    filters: Annotated[JobFilters, Depends()],
    state: Annotated[list[JobState] | None, Query()] = None,
    page_size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
    page_token: str | None = Query(None, max_length=512),
) -> Response:
    """Newest first; filters combine (all must hold); an admin key lists every team's."""
    stmt = select(Job) if who.is_admin else select(Job).where(Job.team_id == who.team_id)
    if state:
        stmt = stmt.where(Job.state.in_([s.value for s in state]))
    stmt = filters.apply(stmt, Job)
    with ctx.db.read() as s:
        rows, token = paginate(s, stmt, Job, page_size, page_token)
        items = [job_document(j) for j in rows]
    return _json(json.dumps({"items": items, "next_page_token": token}, separators=(",", ":")).encode())


FINISHED_CACHE_SIZE = 4096
"""Finished jobs kept serialised in each API process: such a row never changes again, and it
is what clients poll most (the last poll of every job, and every poll after)."""


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get(
    "/{job_id}", response_model=JobOut, summary="Get a job", responses=responses(404), operation_id="get_job"
)
async def get_job(job_id: str, ctx: Ctx, who: Auth) -> Response:
    """The most polled endpoint: one Core select of the columns it shows (no ORM objects,
    not the report)."""
    # A finished job is answered from memory: its row never changes again. The body is built once
    # from the row (`job_document`), not validated again: its spec was validated at submission.
    if (cached := ctx.finished_jobs.get(job_id)) is not None:
        owner, body = cached
        if not who.sees(owner):
            raise not_found("job", job_id)
        return _json(body)

    def read() -> tuple[Any, bytes] | None:
        with ctx.db.engine.connect() as conn:
            row = conn.execute(JOB_BY_ID, {"job_id": job_id}).one_or_none()
        return None if row is None else (row, job_json(row))

    found = await anyio.to_thread.run_sync(read, limiter=db_threads())
    if found is None or not who.sees(found[0].team_id):
        raise not_found("job", job_id)
    row, body = found
    if JobState(row.state) in TERMINAL:
        ctx.finished_jobs[job_id] = (row.team_id, body)
        if len(ctx.finished_jobs) > FINISHED_CACHE_SIZE:
            ctx.finished_jobs.popitem(last=False)
    return _json(body)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job",
    responses=responses(404, 409),
    operation_id="cancel_job",
)
@blocking
def cancel_job(job_id: str, ctx: Ctx, who: Auth) -> Response:
    """A queued job is cancelled at once; a running one becomes CANCELLING until its worker stops."""
    with ctx.db.write() as s:
        try:
            job = lock_job(s, job_id)
        except JobNotFound:
            raise not_found("job", job_id) from None
        if not who.sees(job.team_id):
            raise not_found("job", job_id)
        try:
            job = request_cancel(s, job)
        except JobFinished as exc:
            raise ProblemError(409, str(exc), code="job_finished") from None
        return Response(job_json(job), status_code=202, media_type="application/json")


MAX_EVENT_ID = (1 << 63) - 1
"""Event ids are 64-bit database ids: a larger Last-Event-ID is not one of ours (422)."""
SSE_EVENT = {
    "type": "object",
    "description": "one Server-Sent Event of the stream",
    "properties": {
        "id": {"type": "string", "description": "increasing; send the last one back as Last-Event-ID"},
        "event": {"type": "string", "enum": ["progress", "log", "state"]},
        "data": {"type": "string", "description": "a JSON object"},
        "retry": {"type": "integer", "description": "reconnection delay, ms"},
    },
}


STREAM_RETRY_AFTER_S = 5


def _check_stream_room(ctx: Context, team: str) -> None:
    """429 when this process already serves its most event streams, or the team its share."""
    s = ctx.settings
    if sum(ctx.streams.values()) >= s.max_event_streams:
        raise ProblemError(429, f"this server already serves {s.max_event_streams} event streams; poll the job, or "
                                "follow its stream again shortly", code="too_many_streams",
                           headers={"Retry-After": str(STREAM_RETRY_AFTER_S)})  # fmt: skip
    if ctx.streams[team] >= s.max_event_streams_per_team:
        raise ProblemError(429, f"team {team!r} already follows {ctx.streams[team]} event streams here (its limit is "
                                f"{s.max_event_streams_per_team}); close one, or poll the job",
                           code="too_many_streams", headers={"Retry-After": str(STREAM_RETRY_AFTER_S)})  # fmt: skip


async def _counted(ctx: Context, team: str, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    ctx.streams[team] += 1
    try:
        async for chunk in stream:
            yield chunk
    finally:
        ctx.streams[team] -= 1


@router.delete(
    "/{job_id}",
    status_code=200,
    response_model=JobOut,
    summary="Delete a finished job's files",
    responses=responses(404, 409),
    operation_id="delete_job",
)
@blocking
def delete_job(job_id: str, ctx: Ctx, who: Auth) -> Response:
    """Every artifact of a finished job is deleted (they no longer count against the team's storage);
    the job stays as a record (spec, summary, events) with ``deleted_at`` set."""
    with ctx.db.read() as s:
        load_job(s, job_id, who)
    try:
        delete_artifacts(ctx.db, ctx.store, job_id)
    except JobNotFinished as exc:
        raise ProblemError(409, str(exc), code="job_not_finished") from None
    ctx.finished_jobs.pop(job_id, None)
    with ctx.db.read() as s:
        return Response(job_json(s.get(Job, job_id)), media_type="application/json")


@router.get(
    "/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    operation_id="job_events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "``progress``, ``log`` and ``state`` events until a terminal state; "
            "resumable with Last-Event-ID",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        204: {"description": "the job is finished and no event follows Last-Event-ID"},
        **responses(404),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    ctx: Ctx,
    who: Auth,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID)] = None,
) -> Response:
    after = last_event_id or 0

    def check() -> bool:
        with ctx.db.read() as s:
            load_job(s, job_id, who)
            return has_more_events(s, job_id, after)

    if not await anyio.to_thread.run_sync(check):
        return Response(status_code=204)
    _check_stream_room(ctx, who.team_id)
    return StreamingResponse(
        _counted(ctx, who.team_id, event_stream(ctx, job_id, after)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
