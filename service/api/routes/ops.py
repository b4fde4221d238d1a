"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ..deps import Ctx
from ..problems import ProblemError, responses
from ..schemas import Health

router = APIRouter(tags=["operations"])
CHECK_TIMEOUT_S = 5.0


@router.get("/healthz", response_model=Health, summary="The process is up", operation_id="healthz")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The database and the broker answer (and, under kdq serve, which supervised part is degraded)",
    responses=responses(503),
    operation_id="readyz",
)
async def readyz(ctx: Ctx) -> Health:
    def database() -> None:
        with ctx.db.read() as s:
            s.execute(text("SELECT 1"))

    checks: dict[str, str] = {}
    for name, probe in (("database", database), ("broker", ctx.queues.ping)):
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                await anyio.to_thread.run_sync(probe, abandon_on_cancel=True)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 -- any failure means "not ready"; the caller sees which
            checks[name] = f"unavailable: {type(exc).__name__}"
    failed = [k for k, v in checks.items() if v != "ok"]
    if failed:
        raise ProblemError(
            503, f"not ready: {', '.join(f'{k} {checks[k]}' for k in failed)}", code="not_ready"
        )
    parts = ctx.parts() if ctx.parts is not None else {}
    degraded = any(not state.startswith("ok") for state in parts.values())
    return Health(status="degraded" if degraded else "ready", checks=checks, parts=parts)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(ctx: Ctx) -> Response:
    body = await anyio.to_thread.run_sync(ctx.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
