"""Service test fixtures: real Postgres, real Redis, and the service as real subprocesses.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth; user ``postgres`` or ``root``; a ``test``
database to connect to) and Redis on 127.0.0.1:6379. Override with ``KDQ_TEST_PG_ADMIN``
(a psycopg URL of a database to create test databases from) and ``KDQ_TEST_REDIS``.
Each session gets a fresh uniquely named database (dropped at the end) and its own Redis
key prefix (deleted at the end).

The Postgres stack runs with API keys: ``kdq keys create`` (a real subprocess against the
test database) makes the key of team ``TEAM_A`` that `Stack.client` (and so the ``api``
fixture) sends; `Stack.make_key` makes more.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from .assets import write_assets

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URLS = (
    [os.environ["KDQ_TEST_PG_ADMIN"]]
    if "KDQ_TEST_PG_ADMIN" in os.environ
    else ["postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test"]
)
REDIS_URL = os.environ.get("KDQ_TEST_REDIS", "redis://127.0.0.1:6379/0")
SERVICE_LIMITS = {
    "KDQ_MAX_UPLOAD_BYTES": str(8 << 20),
    "KDQ_UPLOAD_DRAIN_BYTES": str(64 << 20),
    "KDQ_PROGRESS_INTERVAL_S": "0.2",
    "KDQ_CANCEL_POLL_S": "0.2",
    "KDQ_SSE_POLL_S": "2",  # the streams wake on job notices; this poll is only the safety net
}
TEAM_A = "team-a"
"""The team of the Postgres stack's default key (every fixture's uploads and jobs)."""
RETENTION_S = 365 * 24 * 3600
"""The Postgres stack's retention of uploads and artifacts (tests backdate rows past it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDQ_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
    )
    env.update(SERVICE_LIMITS)
    env.update(extra)
    return env


def wait_ready(
    url: str, procs: dict[str, subprocess.Popen[bytes]], log_tail: Callable[[], str], timeout: float = 60
) -> None:
    """Until ``url``/readyz answers 200; fails at once when one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{log_tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s\n{log_tail()}")


def kdq(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


@dataclass
class Stack:
    """Service processes started by a test, with their logs."""

    url: str
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    key: str | None = None
    """The API key `client` sends unless told otherwise (None: no Authorization header)."""

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        """A client sending ``key`` (default: the stack's key) as a bearer token."""
        key = key or self.key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, **kw)

    def make_key(self, team: str, *, admin: bool = False, label: str = "") -> str:
        """``kdq keys create`` against this stack's database; the key it printed."""
        argv = kdq("keys", "create", "--team", team, "--label", label, *(["--admin"] if admin else []))
        out = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_ready(self.url, self.procs, self.log_tail, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, sig)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[name] = p.wait()
        return codes


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_assets(tmp_path_factory.mktemp("assets"))


def _admin_connection() -> psycopg.Connection:
    errors = []
    for url in PG_ADMIN_URLS:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            errors.append(f"{url}: {exc}")
    raise RuntimeError("no PostgreSQL to test against:\n" + "\n".join(errors))


@contextmanager
def _fresh_database() -> Iterator[str]:
    name = f"kdq_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        user = conn.info.user
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}"
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test session (the Postgres stack's; dropped at the end)."""
    with _fresh_database() as url:
        yield url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A fresh, empty database for one test (not migrated)."""
    with _fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def unit_pg_url() -> Iterator[str]:
    """Another fresh database, migrated, for in-process tests whose rows no stack should see."""
    from service.core.migrate import upgrade

    with _fresh_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix for this session's broker keys (deleted afterwards)."""
    prefix = f"kdqtest-{secrets.token_hex(6)}:"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="session")
def pg_stack(pg_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The scaled-out shape: ``kdq migrate``, ``kdq api`` (uvicorn) and two ``kdq worker``s
    (the light ``validate`` queue, and the job queues) on Postgres + Redis."""
    root = tmp_path_factory.mktemp("pg-stack")
    port = free_port()
    env = base_env(
        KDQ_DATABASE_URL=pg_url,
        KDQ_BROKER_URL=REDIS_URL,
        KDQ_BROKER_KEY_PREFIX=redis_prefix,
        KDQ_DATA_DIR=str(root / "data"),
        KDQ_STORAGE_DIR=str(root / "store"),
        KDQ_AUTH="keys",
        KDQ_AUTH_CACHE_S="2",
        # the retention loop runs every second; only rows a test backdates by years expire
        KDQ_RETENTION_INTERVAL_S="1",
        KDQ_UPLOADS_RETENTION_S=str(RETENTION_S),
        KDQ_ARTIFACTS_RETENTION_S=str(RETENTION_S),
        # webhooks: the tests' receivers listen on loopback; retries come quickly
        KDQ_WEBHOOK_ALLOW="127.0.0.1/32",
        KDQ_WEBHOOK_INTERVAL_S="0.2",
        KDQ_WEBHOOK_BACKOFF_S="0.3",
    )
    stack = Stack(f"http://127.0.0.1:{port}", env, root)
    subprocess.run(kdq("migrate"), cwd=REPO, env=env, check=True, capture_output=True)
    stack.key = stack.make_key(TEAM_A, label="tests")
    stack.spawn("api", kdq("api", "--host", "127.0.0.1", "--port", str(port)))
    stack.spawn("worker-validate", kdq("worker", "--queues", "validate", "--name", "validate"))
    stack.spawn("worker-jobs", kdq("worker", "--queues", "cpu,gpu", "--name", "jobs"))
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def api(pg_stack: Stack) -> Iterator[httpx.Client]:
    with pg_stack.client() as client:
        yield client


@dataclass
class FinishedJob:
    job: dict[str, Any]
    events: list[dict[str, Any]]
    polled: list[dict[str, Any]]
    teacher: dict[str, Any]
    dataset: dict[str, Any]


@pytest.fixture(scope="session")
def pg_uploads(pg_stack: Stack, assets: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The tiny teacher and dataset, uploaded and validated once for the session."""
    from .flows import ready_upload

    with pg_stack.client() as client:
        return {
            "teacher": ready_upload(client, "models", assets["teacher"], format="zoo_zip", name="tiny-mlp"),
            "dataset": ready_upload(client, "datasets", assets["data"], format="npz"),
        }


@pytest.fixture(scope="session")
def finished_job(pg_stack: Stack, pg_uploads: dict[str, dict[str, Any]]) -> FinishedJob:
    """One small job run to the end on the Postgres + Redis stack, followed by polling and SSE."""
    from .flows import run_job

    with pg_stack.client() as client:
        return FinishedJob(
            *run_job(client, pg_uploads["teacher"], pg_uploads["dataset"]),
            pg_uploads["teacher"],
            pg_uploads["dataset"],
        )
