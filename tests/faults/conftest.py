"""Fault-test fixtures: one `FaultStack` for the session (private PostgreSQL and Redis, a tmpfs
store, the API and a validate worker; job workers are started and broken by each test), the
tiny teacher and dataset uploaded once, and a separate database on the same private server
for the in-process tests (so the stack's relay and reaper never see their rows)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from service.core.db import Database
from service.core.migrate import upgrade
from tests.service.assets import write_assets

from .stack import FaultStack


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    stack = FaultStack.start(tmp_path_factory.mktemp("faults"))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def fault_uploads(fault_stack: FaultStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return fault_stack.upload_inputs(write_assets(tmp_path_factory.mktemp("fault-assets")))


@pytest.fixture(scope="session")
def unit_db(fault_stack: FaultStack) -> Iterator[Database]:
    name = f"kdq_unit_{secrets.token_hex(4)}"
    admin = f"postgresql://postgres@127.0.0.1:{fault_stack.pg.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:{fault_stack.pg.port}/{name}"
    upgrade(url)
    db = Database(url)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def broker_prefix(fault_stack: FaultStack) -> Iterator[str]:
    """A Redis key prefix of its own on the private Redis (deleted afterwards)."""
    import redis

    prefix = f"unit-{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis(port=fault_stack.redis.port)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


