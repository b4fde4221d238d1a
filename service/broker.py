"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for several processes.

URL: ``kdqsqlite+sqlite:////abs/path/broker.sqlite``. Compared with ``sqla+sqlite``, the
file runs in WAL mode with a busy timeout (an API and two workers share it), a message's row
is deleted once it is acknowledged (kombu keeps them all), and a sender
rings a doorbell (`Doorbell`) that wakes the waiting workers at once: a job starts within
milliseconds of its submission, while an idle worker polls the file only every half second.
"""

from __future__ import annotations

from pathlib import Path
from queue import Empty
from socket import timeout as SocketTimeout
from time import monotonic

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from .doorbell import Doorbell, of_file

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

    def _put(self, queue, payload, **kwargs):  # type: ignore[no-untyped-def]
        super()._put(queue, payload, **kwargs)
        self.connection.bell().ring()

    def basic_ack(self, delivery_tag, multiple=False):  # type: ignore[no-untyped-def]
        super().basic_ack(delivery_tag, multiple)
        self._drop_delivered(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):  # type: ignore[no-untyped-def]
        super().basic_reject(delivery_tag, requeue)  # (a requeued message is stored again, anew)
        self._drop_delivered(delivery_tag)

    def _drop_delivered(self, delivery_tag: str) -> None:
        """kombu keeps every delivered message as an invisible row, forever: the file would grow
        with every job. Once a message is acknowledged or rejected, its row goes."""
        self.session.execute(
            text(
                f"DELETE FROM {self.message_cls.__tablename__} WHERE visible = 0"
                " AND json_extract(payload, '$.properties.delivery_tag') = :tag"
            ),
            {"tag": delivery_tag},
        )
        self.session.commit()


class Transport(sqla.Transport):
    Channel = Channel
    polling_interval = 0.5
    """How often an idle worker looks at the file (a sender's ring wakes it sooner)."""

    def bell(self) -> Doorbell:
        return of_file(make_url(self.client.hostname).database or ":memory:")

    def drain_events(self, connection, timeout=None):  # type: ignore[no-untyped-def]
        """kombu's virtual ``Transport.drain_events``, with the sleep between polls cut short
        by the doorbell."""
        started = monotonic()
        interval = self.polling_interval
        if timeout and interval > timeout:
            interval = timeout
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                if timeout is not None and monotonic() - started >= timeout:
                    raise SocketTimeout() from None
                self.bell().wait(interval)


def register() -> None:
    """Make the ``kdqsqlite`` URL scheme known to kombu, and ``redis://`` use our fixed Redis
    transport (`service.redis_transport`) (idempotent)."""
    from . import redis_transport

    TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
    redis_transport.register()
