"""The FastAPI application factory (``uvicorn --factory service.api.app:create_app``).

The HTTP process never imports torch: it reads and writes rows, streams blobs, and
queues work for the Celery workers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
from fastapi import FastAPI

from ..core.db import Database
from ..core.dberrors import database_unavailable
from ..core.deliveries import deliver_due
from ..core.notices import JobNotices
from ..core.queues import Queues
from ..core.reaper import reap
from ..core.relay import relay_queued_jobs
from ..core.retention import retention_enabled, sweep
from ..core.settings import Settings, get_settings
from ..core.stores import is_remote, store_for
from . import problems, store_problems
from .deps import Context
from .limits import BodyLimit
from .metrics import Metrics
from .notify import webhook_body
from .portal import router as portal_router
from .routes import account, artifacts, jobs, ops, uploads

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"
JSON_BODY_LIMIT = 1 << 20
STAGING_MAX_AGE_S = 24 * 3600.0
"""An upload's staged object or unfinished multipart upload older than this is a failed one's."""


async def _every(interval_s: float, name: str, task: Callable[[], object]) -> None:
    """Run ``task`` in a worker thread every ``interval_s`` seconds, forever. A failed pass is
    logged (quietly while the database is away: /readyz shows that) and tried again next time."""
    while True:
        await anyio.sleep(interval_s)
        try:
            await anyio.to_thread.run_sync(task)
        except Exception as exc:
            if not database_unavailable(exc):
                log.exception("%s pass failed", name)


def build_context(settings: Settings, parts: Callable[[], dict[str, str]] | None = None) -> Context:
    db = Database(settings.database_url)
    queues = Queues(settings)
    return Context(
        settings=settings,
        db=db,
        store=store_for(settings),
        queues=queues,
        metrics=Metrics(db, queues),
        notices=JobNotices(settings.database_url),
        parts=parts,
    )


def create_app(settings: Settings | None = None, parts: Callable[[], dict[str, str]] | None = None) -> FastAPI:
    """``parts``: the state of each supervised child (`kdq serve`), shown by ``/readyz``."""
    settings = settings or get_settings()
    ctx = build_context(settings, parts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.notices.start()  # wakes event streams as soon as a job has news (service.core.notices)
        async with anyio.create_task_group() as tg:
            if settings.reaper_interval_s > 0:  # stale RUNNING jobs (service.core.reaper)
                tg.start_soon(_every, settings.reaper_interval_s, "reaper",
                              partial(reap, ctx.db, settings, ctx.queues))
            if settings.relay_interval_s > 0:  # the job outbox (service.core.relay)
                tg.start_soon(_every, settings.relay_interval_s, "relay",
                              partial(relay_queued_jobs, ctx.db, settings, ctx.queues))
            if retention_enabled(settings):  # expired uploads and artifacts (service.core.retention)
                tg.start_soon(_every, settings.retention_interval_s, "retention",
                              partial(sweep, ctx.db, ctx.store, settings))
            if is_remote(ctx.store) and settings.retention_interval_s > 0:  # failed uploads' leftovers in S3
                tg.start_soon(_every, settings.retention_interval_s, "staging sweep",
                              partial(ctx.store.sweep_staging, STAGING_MAX_AGE_S))  # type: ignore[attr-defined]
            if settings.webhook_interval_s > 0:  # jobs' webhooks (service.core.deliveries)
                tg.start_soon(_every, settings.webhook_interval_s, "webhooks",
                              partial(deliver_due, ctx.db, settings, partial(webhook_body, ctx)))
            yield
            tg.cancel_scope.cancel()
        ctx.notices.stop()
        ctx.db.dispose()

    app = FastAPI(
        title="kdq: compression as a service",
        version=API_VERSION,
        description="Upload a teacher model and a dataset; get back a distilled, quantized student "
        "with the measurements that show what was gained and lost.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    ctx.notices.hooks.append(lambda jobs: [ctx.finished_jobs.pop(job_id, None) for job_id in jobs])
    app.add_middleware(
        BodyLimit, max_bytes=JSON_BODY_LIMIT, streamed_paths=frozenset({"/v1/models", "/v1/datasets"})
    )
    problems.install(app)
    store_problems.install(app)
    for router in (uploads.models_router, uploads.datasets_router, jobs.router, artifacts.router, ops.router,
                   account.router, portal_router):  # fmt: skip
        app.include_router(router)
    return app
