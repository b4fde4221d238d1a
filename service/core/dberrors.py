"""Which database errors mean "the database is away for now" rather than a bug.

The API answers them with a retryable 503 (`service.api.problems`); the worker retries its final
write for a while, and its progress and heartbeat writes simply skip a beat
(`worker.tasks`). Everything else (an integrity error, a bad statement) stays an error.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

RETRY_AFTER_S = 5
"""What a client is told to wait before trying again (``Retry-After``)."""


def database_unavailable(exc: BaseException) -> bool:
    """True for a lost or refused connection, a server shutting down or starting up, and a
    connection pool that stayed empty."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
