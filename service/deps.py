"""What every request handler needs: settings, database, blob store, queues, the caller's team."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, ParamSpec, TypeVar

import anyio
from fastapi import Depends, Request

from .db import POOL_SIZE, Database
from .metrics import Metrics
from .queueing import Queues
from .settings import Settings
from .store import BlobStore


@dataclass
class Context:
    settings: Settings
    db: Database
    store: BlobStore
    queues: Queues
    metrics: Metrics
    finished_jobs: OrderedDict[str, tuple[str, bytes]] = field(default_factory=OrderedDict)
    """Serialised finished jobs by id, with their team (see `service.routes.jobs.get_job`)."""


async def get_ctx(request: Request) -> Context:
    """(``async``, like `current_team`: FastAPI would run a plain function in a worker thread.)"""
    return request.app.state.ctx


async def current_team(request: Request) -> str:
    """The caller's team; one default team until API keys exist."""
    return request.app.state.ctx.settings.default_team


Ctx = Annotated[Context, Depends(get_ctx)]
Team = Annotated[str, Depends(current_team)]


P = ParamSpec("P")
T = TypeVar("T")


def blocking(handler: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """Run a handler that blocks (database, files) in one worker thread.

    FastAPI would run a plain ``def`` handler and then its response validation in two
    separate thread hops; each hop is a scheduler round trip, which dominates a short
    database read. FastAPI reads the parameters through ``functools.wraps``.
    """

    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(
            functools.partial(handler, *args, **kwargs), limiter=db_threads()
        )

    return run


@functools.cache
def db_threads() -> anyio.CapacityLimiter:
    """At most one blocking handler per pooled connection (fewer threads fighting for the GIL)."""
    return anyio.CapacityLimiter(POOL_SIZE)
