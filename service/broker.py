"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for several processes.

URL: ``kdqsqlite+sqlite:////abs/path/broker.sqlite``. Compared with ``sqla+sqlite``, the
file runs in WAL mode with a busy timeout (an API and two workers share it) and the
worker polls every 0.1 s instead of every second, so a job starts promptly.
"""

from __future__ import annotations

from pathlib import Path

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla
from sqlalchemy import create_engine, event
from sqlalchemy.engine import make_url

ALIAS = "kdqsqlite"


class Channel(sqla.Channel):
    def _engine_from_config(self):  # type: ignore[no-untyped-def]
        url = self.connection.client.hostname
        database = make_url(url).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine


class Transport(sqla.Transport):
    Channel = Channel
    polling_interval = 0.1


def register() -> None:
    """Make the ``kdqsqlite`` URL scheme known to kombu, and ``redis://`` use our fixed Redis
    transport (`service.redis_transport`) (idempotent)."""
    from . import redis_transport

    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
    redis_transport.register()
