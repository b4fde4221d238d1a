"""The embedded stack's children, built from the settings: PostgreSQL, Redis and the two Celery
workers (the light ``validate`` queue, and the job queues), in start order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.settings import Settings
from . import postgres, redis
from .layout import DataDirLock, Layout
from .supervisor import Child, Supervisor, stop_child

WORKER_STOP_S = 7.0
"""A worker's warm shutdown: its running job hands itself back (QUEUED, resumed from its last
checkpoint by the next start) at the engine's next cancel check; then it is killed."""


def worker_argv(queues: list[str], concurrency: int, name: str, loglevel: str) -> list[str]:
    """``celery worker`` arguments for one of our workers (shared with ``kdq worker``)."""
    return ["worker", "-Q", ",".join(queues), "-c", str(concurrency), "-n", f"{name}@%h", "-l", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip


def worker_process(queues: list[str], concurrency: int, name: str, loglevel: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "--quiet",
            *worker_argv(queues, concurrency, name, loglevel)]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)


class EmbeddedStack:
    """The children of one data dir's stack. `kdq serve` starts them all (`start`); a command
    that needs only the database while no serve runs uses `database_only`."""

    def __init__(self, settings: Settings, *, job_concurrency: int = 1, validate_concurrency: int = 1,
                 worker_loglevel: str = "WARNING", worker_stop_s: float = WORKER_STOP_S) -> None:  # fmt: skip
        self.settings = settings
        self.layout = Layout(settings.data_dir)
        self.lock = DataDirLock(self.layout)
        self.pg = postgres.EmbeddedPostgres(self.layout)
        self.redis = redis.EmbeddedRedis(self.layout)
        logs = self.layout.logs
        s = settings
        self.children = [
            Child("postgres", lambda: self.pg.start(logs / "postgres.log"), self.pg.ready,
                  stop_signal=signal.SIGINT, stop_timeout_s=10.0),  # SIGINT: PostgreSQL's fast shutdown
            Child("redis", lambda: self.redis.start(logs / "redis.log"), self.redis.ready, tier=1),
            Child("worker-validate", lambda: worker_process([s.queue_validate], validate_concurrency, "validate",
                                                            worker_loglevel),
                  stop_timeout_s=worker_stop_s, tier=2),
            Child("worker-jobs", lambda: worker_process(s.job_queues(), job_concurrency, "jobs", worker_loglevel),
                  stop_timeout_s=worker_stop_s, tier=2),
        ]  # fmt: skip
        self.supervisor = Supervisor(self.children)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start_servers(self) -> None:
        """Lay out the data dir, then PostgreSQL and Redis, each ready before the next."""
        self.layout.prepare()
        self.pg.prepare()
        self.supervisor.start(self.child("postgres"))
        self.redis.prepare()
        self.supervisor.start(self.child("redis"))

    def start_workers(self) -> None:
        for name in ("worker-validate", "worker-jobs"):
            self.supervisor.start(self.child(name))
        self.supervisor.watch()

    def describe(self) -> dict[str, str]:
        """One line per part: what it is, where it listens."""
        s, layout = self.settings, self.layout
        jobs = self.child("worker-jobs").proc
        validate = self.child("worker-validate").proc
        return {
            "postgres": f"PostgreSQL {postgres.version()} on {layout.pg_sockets}/ (data {layout.pgdata})"
            + (f"; runs as {self.pg.user}: PostgreSQL refuses root (run kdq serve as a normal user to keep "
               "one account)" if self.pg.user else ""),
            "redis": f"Redis {redis.version()} on {layout.redis_socket}",
            "worker-validate": f"Celery worker, queue {s.queue_validate} (pid {validate.pid if validate else '-'})",
            "worker-jobs": f"Celery worker, queues {','.join(s.job_queues())} (pid {jobs.pid if jobs else '-'})",
            "store": f"artifact store {s.storage_dir}",
        }

    def stop(self) -> None:
        self.supervisor.stop()

    @contextmanager
    def database_only(self) -> Iterator[None]:
        """PostgreSQL alone for the length of a command (keys, migrations), when no serve holds
        the data dir; when one does, its running server is used as it is."""
        if self.lock.held_elsewhere():
            yield
            return
        self.lock.acquire("a kdq command")
        try:
            self.layout.prepare()
            self.pg.prepare()
            self.supervisor.start(self.child("postgres"))
            try:
                yield
            finally:
                stop_child(self.child("postgres"))
        finally:
            self.lock.release()


def child_env_defaults() -> None:
    """What every worker started from here inherits: no progress bars or load reports from
    transformers / huggingface_hub / tqdm in the logs (a job's progress is its event stream)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data_dir_of(path: str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None
