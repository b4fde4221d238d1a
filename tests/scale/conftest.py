"""Scaled-out fixtures: an S3 server (moto), and the service on PostgreSQL + Redis + S3 with the
S3 traffic of the API and the workers through a `Gate` a test can cut."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.stack import FAST_INTERVALS
from tests.service.conftest import (  # noqa: F401 -- assets: a fixture
    REDIS_URL,
    REPO,
    Stack,
    assets,
    base_env,
    free_port,
    kdq,
)
from tests.service.conftest import _fresh_database as fresh_database
from tests.service.flows import ready_upload

from .s3 import Gate, MotoServer, new_bucket, s3_env, wait_http


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The S3 server `.ci/run` started (``KDQ_TEST_S3_ENDPOINT``), else one of our own."""
    endpoint = os.environ.get("KDQ_TEST_S3_ENDPOINT")
    if endpoint:
        try:
            wait_http(endpoint, timeout=3)
            yield endpoint
            return
        except TimeoutError:
            pass
    server = MotoServer(log=tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server.endpoint
    finally:
        server.close()


@contextmanager
def redis_prefix() -> Iterator[str]:
    prefix = f"kdqs3-{secrets.token_hex(5)}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        found = list(client.scan_iter(match=prefix + "*"))
        if found:
            client.delete(*found)


@dataclass
class S3Stack:
    stack: Stack
    gate: Gate
    endpoint: str
    """moto itself (the test's own view; the service goes through the gate)."""
    bucket: str
    db_url: str
    uploads: dict[str, Any] | None = None

    def client(self, **kw: Any) -> Any:
        return self.stack.client(**kw)

    def spawn_worker(self, name: str, work_dir: Path) -> None:
        env = {**self.stack.env, "KDQ_WORK_DIR": str(work_dir)}
        with open(self.stack.logs / f"{name}.log", "ab") as log:
            self.stack.procs[name] = subprocess.Popen(
                kdq("worker", "--queues", "cpu,gpu", "--name", name), cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


S3_STACK_ENV = {
    **FAST_INTERVALS,
    "KDQ_STORE_RETRY_S": "120",
    "KDQ_CHECKPOINT_SYNC_S": "0.3",
    "KDQ_S3_PART_BYTES": str(5 << 20),
    "KDQ_S3_PRESIGN_MIN_BYTES": str(64 << 10),
    "KDQ_MAX_UPLOAD_BYTES": str(64 << 20),
    "KDQ_RETENTION_INTERVAL_S": "1",
    "KDQ_UPLOADS_RETENTION_S": str(365 * 24 * 3600),
    "KDQ_ARTIFACTS_RETENTION_S": str(365 * 24 * 3600),
}


@pytest.fixture(scope="session")
def s3_stack(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
             assets: dict[str, Path]) -> Iterator[S3Stack]:  # fmt: skip
    """``kdq api`` + a validate worker + a job worker on PostgreSQL, Redis and S3 (through a gate)."""
    root = tmp_path_factory.mktemp("s3-stack")
    host, port = moto_endpoint.removeprefix("http://").rsplit(":", 1)
    gate = Gate((host, int(port)))
    bucket = new_bucket(moto_endpoint)
    with fresh_database() as db_url, redis_prefix() as prefix:
        api_port = free_port()
        env = base_env(KDQ_DATABASE_URL=db_url, KDQ_BROKER_URL=REDIS_URL, KDQ_BROKER_KEY_PREFIX=prefix,
                       KDQ_DATA_DIR=str(root / "data"), KDQ_WORK_DIR=str(root / "work"),
                       **S3_STACK_ENV, **s3_env(gate.endpoint, bucket))  # fmt: skip
        stack = Stack(f"http://127.0.0.1:{api_port}", env, root)
        subprocess.run(kdq("migrate"), cwd=REPO, env=env, check=True, capture_output=True)
        stack.spawn("api", kdq("api", "--host", "127.0.0.1", "--port", str(api_port)))
        stack.spawn("worker-validate", kdq("worker", "--queues", "validate", "--name", "validate"))
        out = S3Stack(stack, gate, moto_endpoint, bucket, db_url)
        out.spawn_worker("worker-jobs", root / "work")
        try:
            stack.wait_ready()
            with stack.client() as c:
                out.uploads = {
                    "teacher": ready_upload(c, "models", assets["teacher"], format="zoo_zip", name="tiny-mlp"),
                    "dataset": ready_upload(c, "datasets", assets["data"], format="npz"),
                }
            yield out
        finally:
            stack.stop()
            gate.close()
