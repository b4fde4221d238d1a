"""Where the embedded stack keeps each part inside the data dir, and the data dir's lock.

::

    <data dir>/
      kdq.lock        held by the one `kdq serve` (or command) that owns the stack
      postgres/       PGDATA
      redis/          Redis's append-only file
      run/            UNIX sockets: pg/.s.PGSQL.5432, redis.sock
      logs/           postgres.log, redis.log
      store/, work/   blobs and worker scratch (as in every setup)

A UNIX socket's path must fit in 108 bytes; when ``run/`` is too deep for that, the sockets
are reached through a short symbolic link in the temp folder (``/tmp/kdq-<hash>``), which
points back into the data dir.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAX_SOCKET_PATH = 100
"""A little under the kernel's limit on a UNIX socket path (107 bytes and a NUL)."""
PG_SOCKET_NAME = ".s.PGSQL.5432"
DATABASE = "kdq"
DATABASE_USER = "postgres"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def run(self) -> Path:
        """The real socket folder, inside the data dir."""
        return self.root / "run"

    @property
    def sockets(self) -> Path:
        """The socket folder as processes name it: ``run/``, or a short link to it."""
        if len(str(self.run / "pg" / PG_SOCKET_NAME)) <= MAX_SOCKET_PATH:
            return self.run
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"kdq-{digest}"

    @property
    def pg_sockets(self) -> Path:
        return self.sockets / "pg"

    @property
    def redis_socket(self) -> Path:
        return self.sockets / "redis.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock_file(self) -> Path:
        return self.root / "kdq.lock"

    @property
    def legacy_sqlite(self) -> Path:
        """The database file of the SQLite-based kdq of before (see `sqlite_import`)."""
        return self.root / "kdq.sqlite"

    def database_url(self) -> str:
        return f"postgresql+psycopg://{DATABASE_USER}@/{DATABASE}?host={self.pg_sockets}"

    def broker_url(self) -> str:
        return f"redis+socket://{self.redis_socket}"

    def redis_url(self) -> str:
        """The same Redis as a redis-py URL."""
        return f"unix://{self.redis_socket}"

    def prepare(self) -> None:
        """Make the folders, and the short link to ``run/`` when the sockets need one."""
        for folder in (self.root, self.run, self.logs, self.redis_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if self.sockets != self.run:
            link = self.sockets
            if link.is_symlink() and Path(os.readlink(link)) != self.run:
                link.unlink()  # (a hash collision with another data dir: the newest wins)
            if not link.is_symlink():
                link.symlink_to(self.run, target_is_directory=True)


class DataDirBusy(RuntimeError):
    pass


class DataDirLock:
    """An exclusive lock on the data dir (``flock`` on ``kdq.lock``, released when the process
    ends, however it ends). The file holds the owner's pid, for the message to whoever else tries."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.lock_file
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = self.path.read_text().strip() or "another process"
            raise DataDirBusy(
                f"{self.path.parent} is in use by {owner}; stop it first, or give another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{what} (pid {os.getpid()})".encode())
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (without taking it)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
