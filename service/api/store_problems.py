"""The blob store being unreachable (S3 down, a network cut, timeouts) is a retryable 503 problem
with Retry-After, like a database that is away: nothing half-written is kept or listed."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..core.store import StoreUnavailable
from .problems import Problem, problem_response

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


def install(app: FastAPI) -> None:
    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("object store unavailable on %s %s: %s", request.method, request.url.path, exc)
        problem = Problem(title="Service Unavailable", status=503, code="store_unavailable",
                          detail="the artifact store is unreachable right now; nothing was stored, try again shortly")  # fmt: skip
        return problem_response(problem, request, {"Retry-After": str(RETRY_AFTER_S)})
