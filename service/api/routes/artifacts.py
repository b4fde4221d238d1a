"""A job's results: metrics (report.json), the HTML report, artifact listing and downloads.

Downloads carry a strong ETag (the sha256), answer ``If-None-Match`` with 304 and honour
``Range`` / ``If-Range`` (Starlette's FileResponse serves the ranges; bad ranges are
answered here as problems).
"""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from ...core.auth import Principal
from ...core.deletion import JobNotFinished, delete_artifacts
from ...core.models import Artifact
from ..deps import PROTECTED, Auth, Context, Ctx, blocking
from ..problems import AUTH_RESPONSES, ProblemError, not_found, responses
from ..remote_files import remote_response
from ..schemas import ArtifactList, ArtifactOut
from .jobs import load_job

router = APIRouter(
    prefix="/v1/jobs/{job_id}", tags=["jobs"], dependencies=PROTECTED, responses=AUTH_RESPONSES
)
MEDIA_TYPES = {
    "report_html": "text/html; charset=utf-8",
    "report_json": "application/json",
    "manifest": "application/json",
    "student": "application/zip",
}


class _FullFile(FileResponse):
    """A FileResponse that ignores the request's Range header."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k != b"range"]
        await super().__call__({**scope, "headers": headers}, receive, send)


def _media(art: Artifact) -> str:
    return MEDIA_TYPES.get(art.kind) or mimetypes.guess_type(art.name)[0] or "application/octet-stream"


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def _serve(
    ctx: Context,
    art: Artifact,
    if_none_match: str | None,
    range_: str | None,
    disposition: str = "attachment",
    if_range: str | None = None,
) -> Response:
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"}
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    path = ctx.store.local_path(art.sha256)
    if path is None:  # a remote store (S3): ranged GETs passed through, or a presigned redirect
        return remote_response(ctx.store, sha256=art.sha256, size=art.size_bytes,  # type: ignore[arg-type]
                               filename=art.name, media_type=_media(art), disposition=disposition, headers=headers,
                               range_=_checked_range(range_, art.size_bytes), if_range=if_range)  # fmt: skip
    if not path.is_file():
        raise ProblemError(410, f"the file of artifact {art.name!r} is no longer stored", code="gone")
    if range_ is not None and not range_.strip().lower().startswith("bytes="):
        # RFC 9110 §14.2: a Range in a unit we do not know is ignored
        return _FullFile(
            path,
            media_type=_media(art),
            headers=headers,
            filename=art.name,
            content_disposition_type=disposition,
        )
    _checked_range(range_, art.size_bytes)
    media = MEDIA_TYPES.get(art.kind) or mimetypes.guess_type(art.name)[0] or "application/octet-stream"
    return FileResponse(
        path, media_type=media, headers=headers, filename=art.name, content_disposition_type=disposition
    )


def _checked_range(range_: str | None, size: int) -> str | None:
    """The Range header when it is in bytes and fits the file; a problem when it does not;
    None for a unit we do not know (RFC 9110 §14.2: ignored)."""
    if range_ is None or not range_.strip().lower().startswith("bytes="):
        return None
    try:
        FileResponse._parse_range_header(range_, size)
    except MalformedRangeHeader as exc:
        raise ProblemError(400, f"bad Range header: {exc.content}", code="bad_range") from None
    except RangeNotSatisfiable:
        raise ProblemError(
            416,
            f"the range is outside the file ({size} bytes)",
            code="bad_range",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None
    return range_


def _load_artifact(
    ctx: Context, job_id: str, who: Principal, *, name: str | None = None, kind: str | None = None
) -> Artifact:
    with ctx.db.read() as s:
        load_job(s, job_id, who)
        stmt = select(Artifact).where(Artifact.job_id == job_id)
        stmt = stmt.where(Artifact.name == name) if name is not None else stmt.where(Artifact.kind == kind)
        art = s.scalars(stmt.limit(1)).first()
    if art is None:
        raise not_found("artifact", name or kind or "")
    return art


IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match")]
IfRange = Annotated[str | None, Header(alias="If-Range")]
RangeHeader = Annotated[str | None, Header(alias="Range")]
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FILE_CONTENT = {
    "application/octet-stream": _BINARY,
    "application/zip": _BINARY,
    "application/json": {"schema": {"type": "object", "description": "report.json, manifest.json"}},
    "text/html": {"schema": {"type": "string"}},
}
"""By the artifact's kind or name: ONNX models and other files are octet-stream."""
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the file", "content": _FILE_CONTENT},
    307: {"description": "a redirect to the file in the object store (large artifacts, when configured)"},
    206: {"description": "the requested range", "content": {media: {} for media in _FILE_CONTENT}},
    304: {"description": "not modified (If-None-Match matched the ETag)"},
    **responses(400, 404, 410, 416),
}


@router.get(
    "/metrics",
    summary="The job's metrics (report.json)",
    operation_id="job_metrics",
    response_model=dict[str, Any],
    responses=responses(404),
)
@blocking
def job_metrics(job_id: str, ctx: Ctx, who: Auth) -> Any:
    with ctx.db.read() as s:
        job = load_job(s, job_id, who)
        metrics = job.metrics  # a deferred column: read it while the session is open
    if metrics is None:
        raise ProblemError(
            404, f"job {job_id} has no metrics ({job.state}); they come with SUCCEEDED", code="not_available"
        )
    return metrics


@router.get(
    "/report",
    summary="The job's HTML report",
    operation_id="job_report",
    response_class=Response,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, **responses(404)},
)
@blocking
def job_report(job_id: str, ctx: Ctx, who: Auth, if_none_match: IfNoneMatch = None) -> Response:
    return _serve(ctx, _load_artifact(ctx, job_id, who, kind="report_html"), if_none_match, None, "inline")


@router.get(
    "/artifacts",
    response_model=ArtifactList,
    summary="List a job's artifacts",
    responses=responses(404),
    operation_id="list_artifacts",
)
@blocking
def list_artifacts(job_id: str, ctx: Ctx, who: Auth) -> ArtifactList:
    with ctx.db.read() as s:
        load_job(s, job_id, who)
        rows = s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()
        return ArtifactList(items=[ArtifactOut.of(r) for r in rows])


@router.get(
    "/artifacts/{name}",
    summary="Download an artifact",
    operation_id="get_artifact",
    response_class=Response,
    responses=FILE_RESPONSES,
)
@blocking
def get_artifact(
    job_id: str,
    name: str,
    ctx: Ctx,
    who: Auth,
    if_none_match: IfNoneMatch = None,
    range_: RangeHeader = None,
    if_range: IfRange = None,
) -> Response:
    return _serve(ctx, _load_artifact(ctx, job_id, who, name=name), if_none_match, range_, if_range=if_range)


@router.delete(
    "/artifacts/{name}",
    status_code=204,
    summary="Delete one artifact of a finished job",
    operation_id="delete_artifact",
    responses=responses(404, 409),
)
@blocking
def delete_artifact(job_id: str, name: str, ctx: Ctx, who: Auth) -> Response:
    """The file is gone (and no longer counts against the team's storage); the job keeps its record."""
    with ctx.db.read() as s:
        load_job(s, job_id, who)
    try:
        deleted = delete_artifacts(ctx.db, ctx.store, job_id, name)
    except JobNotFinished as exc:
        raise ProblemError(409, str(exc), code="job_not_finished") from None
    if not deleted:
        raise not_found("artifact", name)
    ctx.finished_jobs.pop(job_id, None)
    return Response(status_code=204)
