"""Database engine and sessions for the API and the worker (plain SQLAlchemy, no FastAPI).

PostgreSQL everywhere (the embedded one of `kdq serve`, or a server of your own): a
read-then-write (a state transition) locks its rows with ``SELECT … FOR UPDATE``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

POOL_SIZE = 16
"""Connections kept open: as many as the API's database threads (`service.api.deps.blocking`),
so a busy API never opens and closes connections per request."""


def make_engine(url: str, *, pool_size: int = POOL_SIZE) -> Engine:
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


class Database:
    """One engine plus two session factories: ``read()`` and ``write()``."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        from .notices import install_hooks

        install_hooks()  # committed job events are announced to the API's event streams
        self.engine = make_engine(url, pool_size=pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
