"""What every request handler needs: settings, database, blob store, queues, the caller (`Principal`)."""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, ParamSpec, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..core.auth import KeyCache, Principal, bearer_token, ensure_team, lookup
from ..core.db import POOL_SIZE, Database
from ..core.notices import JobNotices
from ..core.queues import Queues
from ..core.settings import Settings
from ..core.store import BlobStore
from .metrics import Metrics
from .problems import FieldError, ProblemError, unprocessable


@dataclass
class Context:
    settings: Settings
    db: Database
    store: BlobStore
    queues: Queues
    metrics: Metrics
    notices: JobNotices
    parts: Callable[[], dict[str, str]] | None = None
    """The supervised children's states (`kdq serve`); None scaled out."""
    finished_jobs: OrderedDict[str, tuple[str, bytes]] = field(default_factory=OrderedDict)
    """Serialised finished jobs by id, with their team (see `service.api.routes.jobs.get_job`)."""
    streams: Counter[str] = field(default_factory=Counter)
    """Event streams open in this process, by team."""
    keys: KeyCache = field(init=False)
    """API keys this process accepted in the last ``auth_cache_s`` seconds."""
    default_team_ready: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.settings.auth_cache_s)


async def get_ctx(request: Request) -> Context:
    """(``async``, like `current_principal`: FastAPI would run a plain function in a worker thread.)"""
    return request.app.state.ctx


bearer = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="kdq_<prefix>_<secret>",
    description="A team's API key (`kdq keys create --team NAME`), as `Authorization: Bearer <key>`.",
    auto_error=False,
)
"""Declares the scheme in the OpenAPI document; the header itself is read by `current_principal`."""


def unauthorized() -> ProblemError:
    """One answer for a missing, malformed, unknown or revoked key: nothing tells them apart."""
    return ProblemError(
        401,
        "a valid API key is required: send Authorization: Bearer <key> (made with kdq keys create)",
        code="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="kdq"'},
    )


async def current_principal(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller: the team of its API key, or the default team when ``auth`` is ``none``."""
    ctx: Context = request.app.state.ctx
    if ctx.settings.auth == "none":
        if not ctx.default_team_ready:
            team = ctx.settings.default_team
            await anyio.to_thread.run_sync(ensure_team, ctx.db, team, limiter=db_threads())
            ctx.default_team_ready = True
        return Principal(ctx.settings.default_team)
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise unauthorized()
    if (principal := ctx.keys.get(token)) is not None:
        return principal
    principal = await anyio.to_thread.run_sync(lookup, ctx.db, token, limiter=db_threads())
    if principal is None:
        raise unauthorized()
    ctx.keys.put(token, principal)
    return principal


async def no_nul_parameters(request: Request) -> None:
    """422 for a NUL character in a path or query parameter (no stored id or name has one, and
    PostgreSQL cannot even compare with one)."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        if "\x00" in name or "\x00" in str(value):
            raise unprocessable(
                [FieldError(parameter=name.replace("\x00", "\\0"), detail="must not contain NUL characters")]
            )


Ctx = Annotated[Context, Depends(get_ctx)]
Auth = Annotated[Principal, Depends(current_principal)]
PROTECTED = [Depends(current_principal), Depends(no_nul_parameters)]
"""The dependencies of every /v1 router: a valid key first, then parameters PostgreSQL can take."""


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
