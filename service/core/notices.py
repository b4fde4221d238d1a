"""Job notices: the API learns that a job has new events as soon as they are committed, so its
event streams (`service.api.sse`) wake at once instead of polling the database.

Whoever commits `JobEvent` rows (a worker's progress, any state transition) announces the
job, by the session hook `install_hooks` sets once per process: a ``NOTIFY kdq_jobs`` in the
same transaction (delivered on commit, dropped on rollback), which reaches every API process on
any machine. In each API process one `JobNotices` thread listens and wakes the streams that
watch the job. A notice that is lost only costs the stream its fallback poll (``sse_poll_s``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from .models import JobEvent

log = logging.getLogger(__name__)
CHANNEL = "kdq_jobs"
_installed = False


def install_hooks() -> None:
    """Announce, from every session of this process, the jobs whose events it commits."""
    global _installed
    if _installed:
        return
    event.listen(Session, "after_flush", _after_flush)
    _installed = True


def _after_flush(session: Session, _context: Any) -> None:
    jobs = {obj.job_id for obj in session.new if isinstance(obj, JobEvent)}
    if not jobs:
        return
    conn = session.connection()
    for job_id in sorted(jobs):  # delivered when (and if) the transaction commits
        conn.execute(text("SELECT pg_notify(:channel, :job)"), {"channel": CHANNEL, "job": job_id})


class JobNotices:
    """In an API process: one thread hears the notices and wakes the streams watching each job."""

    WAIT_S = 1.0
    """How long the thread waits for a notice before it looks whether it should stop."""

    def __init__(self, database_url: str) -> None:
        self.url = make_url(database_url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = False
        """Whether the listener is up (tests wait for it before they commit)."""
        self.hooks: list[Callable[[list[str]], None]] = []
        """Called (in the event loop) with the ids of jobs that have news: the API drops a deleted
        job from its cache of finished ones."""
        self.closing = False
        """Set when the server begins to stop: every event stream ends (`close_streams`)."""

    def start(self) -> None:
        """Start listening (from the event loop's thread: the streams' events belong to it)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-notices")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def close_streams(self) -> None:
        """End every event stream now (the server is stopping; clients resume elsewhere with
        ``Last-Event-ID``). Safe to call from any thread, a signal handler included."""
        self.closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, list(self._watchers))

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``job_id`` has new events (clear it before each read)."""
        changed = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(changed)
        try:
            yield changed
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(changed)
                if not watchers:
                    del self._watchers[job_id]

    def _wake(self, jobs: list[str]) -> None:
        for hook in self.hooks:
            hook(jobs)
        for job_id in jobs:
            for changed in self._watchers.get(job_id, ()):
                changed.set()

    def _deliver(self, jobs: list[str]) -> None:
        if jobs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, jobs)

    def _run(self) -> None:
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        pause = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening, pause = True, 0.5
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=self.WAIT_S):  # each as it comes
                            self._deliver([notice.payload])
            except Exception as exc:  # the database is away: streams poll meanwhile
                if self.listening:
                    log.warning("job notices stopped (%s); event streams poll until they are back", exc)
                self.listening = False
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)
        self.listening = False
