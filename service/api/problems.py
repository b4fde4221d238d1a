"""RFC 9457 problem details: the one error format of the API, never a stack trace."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.compression.errors import close_names, did_you_mean

from ..core.dberrors import RETRY_AFTER_S, database_unavailable
from ..core.quotas import QuotaExceeded

log = logging.getLogger(__name__)
PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    detail: str
    pointer: str | None = None
    """JSON pointer (as a URI fragment) to the bad field of a JSON or form body."""
    parameter: str | None = None
    """The bad query, path or header parameter."""

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        return {k: v for k, v in handler(self).items() if v is not None}


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str | None = None
    """A stable machine-readable tag (e.g. ``invalid_model``, ``not_found``)."""
    errors: list[FieldError] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        return {k: v for k, v in handler(self).items() if v is not None}


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        code: str | None = None,
        title: str | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem = Problem(
            title=title or phrase(status),
            status=status,
            detail=detail,
            code=code,
            errors=list(errors) if errors else None,
        )
        self.headers = headers


def not_found(what: str, ident: str) -> ProblemError:
    return ProblemError(404, f"{what} {ident!r} does not exist", code="not_found")


def unprocessable(errors: Sequence[FieldError], detail: str = "the request is not valid") -> ProblemError:
    return ProblemError(422, detail, code="invalid_request", errors=errors)


class ProblemResponse(JSONResponse):
    """Rendered as ASCII JSON: a problem may quote the bad input back (a key holding a lone surrogate,
    which UTF-8 cannot encode), and must still be sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def problem_response(
    problem: Problem, request: Request | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    if request is not None and problem.instance is None:
        problem = problem.model_copy(update={"instance": request.url.path})
    return ProblemResponse(
        problem.model_dump(), status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


PHRASES = {413: "Content Too Large", 422: "Unprocessable Content"}
"""RFC 9110's names where Python 3.11's ``HTTPStatus`` still has the old ones ("Unprocessable Entity"): one
title per status, whichever path raised it."""


def phrase(status: int) -> str:
    return PHRASES.get(status) or HTTPStatus(status).phrase


def pointer(loc: Sequence[Any]) -> str:
    """``("body", "distillation", "epochs")`` → ``#/distillation/epochs`` (RFC 6901 escaping)."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in loc]
    return "#/" + "/".join(parts) if parts else "#"


def field_errors(
    errors: Sequence[dict[str, Any]], body_prefix: tuple[str, ...] = ("body",), known: Sequence[str] = ()
) -> list[FieldError]:
    """Pydantic / FastAPI error dicts → `FieldError`s (body → pointer, others → parameter). An unknown
    field close to one of the ``known`` names says which it may be meant as (``distilation``)."""
    out = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden" and loc and known:
            close = close_names(str(loc[-1]), known)
            if close and close[0] == str(loc[-1]):  # a real field, of another method or kind of this block
                msg += "; that field belongs to another method (or kind) of this block, not to the one given"
            elif close:
                msg += did_you_mean(str(loc[-1]), known)
        if loc[: len(body_prefix)] == body_prefix:
            out.append(FieldError(detail=msg, pointer=pointer(loc[len(body_prefix) :])))
        elif loc and loc[0] in ("query", "path", "header", "cookie"):
            out.append(FieldError(detail=msg, parameter=".".join(str(p) for p in loc[1:])))
        else:
            out.append(FieldError(detail=msg, pointer=pointer(loc)))
    return out


def validation_problem(exc: ValidationError, prefix: tuple[str, ...] = (), known: Sequence[str] = ()) -> ProblemError:
    """A pydantic error raised on data that came from the client (form fields, JSON); ``known``: the
    fields it takes, for a typo's hint."""
    return unprocessable(field_errors([{**e, "loc": (*prefix, *e["loc"])} for e in exc.errors()], (), known))


def _unstorable_text(text: str) -> str | None:
    if "\x00" in text:
        return "text must not contain NUL characters"
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return "text must be valid Unicode (it holds a lone surrogate, e.g. \\ud800)"
    return None


def find_unstorable(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str] | None:
    """Where JSON-like data holds what PostgreSQL cannot store, and what: a NUL character or a lone
    surrogate in a string or key, a NaN or an infinity; None when everything can be stored.

    Python's JSON parser accepts ``NaN``, ``Infinity`` and ``"\ud800"``; JSONB refuses them, so such a
    value is refused as input, not left to fail in the database."""
    if isinstance(value, str):
        reason = _unstorable_text(value)
        return (path, reason) if reason else None
    if isinstance(value, float) and not math.isfinite(value):
        return path, "numbers must be finite (not NaN or Infinity)"
    if isinstance(value, dict):
        for k, v in value.items():
            if (reason := _unstorable_text(str(k))) is not None:
                return (*path, str(k)), reason
            if (found := find_unstorable(v, (*path, str(k)))) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := find_unstorable(v, (*path, str(i)))) is not None:
                return found
    return None


def reject_unstorable(value: Any) -> None:
    """422 pointing at the first value that cannot be stored (`find_unstorable`)."""
    if (found := find_unstorable(value)) is not None:
        where, reason = found
        raise unprocessable([FieldError(pointer=pointer(where), detail=reason)])


def install(app: FastAPI) -> None:
    """Answer every error as a problem."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.problem, request, exc.headers)

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        problem = Problem(title="Too Many Requests", status=429, code=exc.code, detail=exc.detail)
        return problem_response(problem, request, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc.errors(), known=_field_names(request.app))
        return problem_response(
            Problem(
                title="Unprocessable Content",
                status=422,
                code="invalid_request",
                detail="the request is not valid",
                errors=errors,
            ),
            request,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(
            Problem(
                title=phrase(exc.status_code), status=exc.status_code, detail=detail, code=code
            ),
            request,
            dict(exc.headers or {}),
        )

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        """The database is away (restarting, unreachable, out of connections): a retryable 503;
        the pool reconnects by itself (``pool_pre_ping``) once it is back."""
        if not database_unavailable(exc):
            return await _unexpected(request, exc)
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(
            Problem(
                title="Service Unavailable",
                status=503,
                code="database_unavailable",
                detail="the database is unavailable right now; try again shortly",
            ),
            request,
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            Problem(
                title="Internal Server Error",
                status=500,
                code="internal_error",
                detail="an internal error occurred; it has been logged",
            ),
            request,
        )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given problem statuses."""
    return {
        s: {
            "description": phrase(s),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in sorted(set(statuses))
    }


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given problem statuses (and 422, which any route
    with parameters may answer)."""
    return problem_responses(*statuses, 422)


AUTH_RESPONSES = problem_responses(401)
"""What every route behind an API key may answer (on its router)."""


def _field_names(app: FastAPI) -> list[str]:
    """Every property name the published schemas know (FastAPI caches the schema after its first build)."""
    schemas = app.openapi().get("components", {}).get("schemas", {})
    return sorted({name for schema in schemas.values() for name in schema.get("properties", {})})
