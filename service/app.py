"""The FastAPI application factory (``uvicorn --factory service.app:create_app``).

The HTTP process never imports torch: it reads and writes rows, streams blobs, and
queues work for the Celery workers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from . import problems
from .db import Database
from .dberrors import database_unavailable
from .deps import Context
from .limits import BodyLimit
from .metrics import Metrics
from .queueing import Queues
from .reaper import reap_stale_jobs
from .relay import relay_queued_jobs
from .retention import retention_enabled, sweep
from .routes import artifacts, jobs, ops, uploads
from .settings import Settings, get_settings
from .store import make_store

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"
JSON_BODY_LIMIT = 1 << 20


async def _reaper_loop(ctx: Context) -> None:
    interval = ctx.settings.reaper_interval_s
    while True:
        await anyio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(reap_stale_jobs, ctx.db, ctx.settings, ctx.queues.send_job)
        except Exception:  # keep reaping next time; a broken DB shows in /readyz
            log.exception("reaper pass failed")


async def _relay_loop(ctx: Context) -> None:
    """The job outbox relay (see `service.relay`): re-sends QUEUED jobs whose message is missing."""
    while True:
        await anyio.sleep(ctx.settings.relay_interval_s)
        try:
            await anyio.to_thread.run_sync(relay_queued_jobs, ctx.db, ctx.settings, ctx.queues)
        except Exception as exc:  # try again next time
            if not database_unavailable(exc):
                log.exception("relay pass failed")


async def _retention_loop(ctx: Context) -> None:
    """Delete expired uploads and artifacts (see `service.retention`)."""
    while True:
        await anyio.sleep(ctx.settings.retention_interval_s)
        try:
            await anyio.to_thread.run_sync(sweep, ctx.db, ctx.store, ctx.settings)
        except Exception:  # try again next time
            log.exception("retention pass failed")


def build_context(settings: Settings) -> Context:
    db = Database(settings.database_url)
    queues = Queues(settings)
    assert settings.storage_dir is not None
    return Context(
        settings=settings,
        db=db,
        store=make_store(settings.storage_dir),
        queues=queues,
        metrics=Metrics(db, queues),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    ctx = build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if settings.reaper_interval_s > 0:
                tg.start_soon(_reaper_loop, ctx)
            if settings.relay_interval_s > 0:
                tg.start_soon(_relay_loop, ctx)
            if retention_enabled(settings):
                tg.start_soon(_retention_loop, ctx)
            yield
            tg.cancel_scope.cancel()
        ctx.db.dispose()

    app = FastAPI(
        title="kdq: compression as a service",
        version=API_VERSION,
        description="Upload a teacher model and a dataset; get back a distilled, quantized student "
        "with the measurements that show what was gained and lost.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.add_middleware(
        BodyLimit, max_bytes=JSON_BODY_LIMIT, streamed_paths=frozenset({"/v1/models", "/v1/datasets"})
    )
    problems.install(app)
    for router in (uploads.models_router, uploads.datasets_router, jobs.router, artifacts.router, ops.router):
        app.include_router(router)
    return app
