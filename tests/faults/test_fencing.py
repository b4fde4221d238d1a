"""The pieces behind "no job lost, none stuck", in process against the private PostgreSQL and
Redis: duplicate deliveries under concurrency, fencing of a stale attempt, the work-folder
hand-over that makes a retry resume, out-of-space detection, and the outbox relay reading
what a real broker holds."""

from __future__ import annotations

import errno
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Consumer
from sqlalchemy import func, select, update

from service.core import redis_transport
from service.core.db import Database
from service.core.lifecycle import CancelCheck, Fence, Heartbeat, begin, finish
from service.core.models import Artifact, Job, JobEvent, utcnow
from service.core.outcomes import storage_full
from service.core.progress import ProgressRecorder
from service.core.queues import Queues
from service.core.relay import relay_queued_jobs
from service.core.settings import Settings
from service.core.states import JobState
from service.core.store import LocalStore
from tests.service.rows import add_job
from worker.compression.types import Progress
from worker.files import take_over_work
from worker.tasks import Runtime

from .stack import FaultStack, PrivateRedis

UNUSED_DB = "postgresql+psycopg://unused@/unused"
"""Settings whose database is never connected (the tests pass their own)."""


def runtime_for(db: Database, tmp_path: Path) -> Runtime:
    settings = Settings(database_url=UNUSED_DB, storage_dir=tmp_path / "store", stale_after_s=2)
    return Runtime(settings, db, LocalStore(tmp_path / "store"), os.getpid())


def events(db: Database, job_id: str, kind: str | None = None) -> list[JobEvent]:
    with db.read() as s:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(s.scalars(stmt.where(JobEvent.kind == kind) if kind else stmt))


def test_duplicate_deliveries_begin_the_job_once(unit_db: Database, tmp_path: Path) -> None:
    """Eight deliveries of one job at the same moment, each on its own connection: exactly one
    moves it to RUNNING; the others are dropped."""
    rt = runtime_for(unit_db, tmp_path)
    job_id = add_job(unit_db)
    barrier = threading.Barrier(8)
    won: list[Job | None] = []

    def deliver() -> None:
        barrier.wait()
        won.append(begin(rt.db, job_id))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 8 and sum(j is not None for j in won) == 1
    with unit_db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.attempts) == ("RUNNING", 1)
    assert [e.data["state"] for e in events(unit_db, job_id, "state")] == ["RUNNING"]


def test_a_stale_attempt_writes_nothing(unit_db: Database, tmp_path: Path) -> None:
    """Attempt 1 was given up on and attempt 2 runs: every write of attempt 1 is refused (and
    it notices), while attempt 2's go through."""
    rt = runtime_for(unit_db, tmp_path)
    beat = utcnow() - timedelta(seconds=30)
    job_id = add_job(unit_db, JobState.RUNNING, attempts=2, heartbeat_at=beat)
    stale, current = Fence(job_id, 1), Fence(job_id, 2)

    recorder = ProgressRecorder(unit_db, job_id, 0.0, stale)
    recorder(Progress("distill", 5, 10, loss=0.5))
    recorder.log("a line from the past")
    recorder.flush()
    assert stale.lost.is_set() and events(unit_db, job_id) == []

    stale.lost.clear()
    heartbeat = Heartbeat(unit_db, job_id, 0.05, stale)
    heartbeat.start()
    heartbeat.join(5)
    assert not heartbeat.is_alive() and stale.lost.is_set()

    stale.lost.clear()
    assert CancelCheck(unit_db, job_id, 0.0, stale)() is True and stale.lost.is_set()
    assert CancelCheck(unit_db, job_id, 0.0, current)() is False

    blob = tmp_path / "student.zip"
    blob.write_bytes(b"stale bytes")
    ref = rt.store.put_file(blob)
    art = Artifact(job_id=job_id, name="student.zip", team_id="default", kind="student",
                   sha256=ref.sha256, size_bytes=ref.size)  # fmt: skip
    assert finish(rt.db, rt.store, stale, JobState.SUCCEEDED, artifacts=[art]) is None
    with unit_db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "RUNNING" and job.heartbeat_at == beat
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 0

    recorder = ProgressRecorder(unit_db, job_id, 0.0, current)
    recorder(Progress("distill", 6, 10))
    recorder.close()
    assert finish(rt.db, rt.store, current, JobState.SUCCEEDED, stage="done") is JobState.SUCCEEDED
    assert [e.kind for e in events(unit_db, job_id)] == ["progress", "state"]


def test_finish_restores_a_blob_a_superseded_attempt_released(unit_db: Database, tmp_path: Path) -> None:
    """Two attempts made the same bytes; the stale one released "its" blob just before the
    owner recorded it: the owner stores it again, so the artifact never points at nothing."""
    rt = runtime_for(unit_db, tmp_path)
    job_id = add_job(unit_db, JobState.RUNNING, attempts=1)
    path = tmp_path / "model_fp32.onnx"
    path.write_bytes(b"identical output")
    ref = rt.store.put_file(path)
    rt.store.delete(ref.sha256)  # what release_blob of the other attempt did
    art = Artifact(job_id=job_id, name=path.name, team_id="default", kind="onnx_fp32",
                   sha256=ref.sha256, size_bytes=ref.size)  # fmt: skip
    reached = finish(rt.db, rt.store, Fence(job_id, 1), JobState.SUCCEEDED, artifacts=[art], files={path.name: path})
    assert reached is JobState.SUCCEEDED and rt.store.exists(ref.sha256)


def test_a_retry_takes_over_the_latest_work_folder(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    out1, work1, previous = take_over_work(folder, 1)
    assert previous is None and work1.is_dir() and out1.is_dir()
    (work1 / "checkpoints").mkdir()
    (work1 / "checkpoints" / "latest.json").write_text("{}")
    (out1 / "partial.onnx").write_text("half")
    out3, work3, previous = take_over_work(folder, 3)  # attempt 2 never got to run
    assert previous == 1 and (work3 / "checkpoints" / "latest.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir()) == ["attempt-3"]  # the partial output is gone
    assert list(out3.iterdir()) == []


def test_out_of_space_is_recognised_behind_other_errors() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/store/tmp/upload-x")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as wrapped:
        assert storage_full(wrapped) is full
    assert storage_full(OSError(errno.EACCES, "denied")) is None and storage_full(ValueError()) is None


# --- the outbox relay against the real private Redis ------------------------------------------


def relay_settings(stack: FaultStack, prefix: str) -> Settings:
    return Settings(
        database_url=UNUSED_DB, broker_url=stack.redis.url, broker_key_prefix=prefix, relay_grace_s=1.0
    )


def queued_ids(queues: Queues) -> set[str]:
    held = queues.held_messages()
    assert held is not None
    return held.waiting


def test_relay_sends_what_the_broker_never_got_or_lost(
    unit_db: Database, fault_stack: FaultStack, broker_prefix: str
) -> None:
    settings = relay_settings(fault_stack, broker_prefix)
    queues = Queues(settings)
    old = utcnow() - timedelta(seconds=30)
    never_sent = add_job(unit_db, updated_at=old)
    held = add_job(unit_db, enqueued_at=old)
    queues.send_job(held, "cpu")
    lost = add_job(unit_db, enqueued_at=old)
    fresh = add_job(unit_db)  # just committed: its sender may be about to send it
    running = add_job(unit_db, JobState.RUNNING, enqueued_at=old)
    with unit_db.write() as s:  # rows made by earlier tests are none of this test's business
        mine = [never_sent, held, lost, fresh, running]
        s.execute(update(Job).where(Job.id.not_in(mine)).values(state="FAILED"))

    sent = relay_queued_jobs(unit_db, settings, queues)
    assert sorted(sent) == sorted([never_sent, lost])
    assert {never_sent, held, lost} <= queued_ids(queues) and fresh not in queued_ids(queues)
    with unit_db.read() as s:
        assert all(s.get(Job, j).enqueued_at > old for j in (never_sent, lost))  # type: ignore[union-attr]
    notes = [e.data["message"] for e in events(unit_db, lost, "log")]
    assert notes == ["sent to the queue again: the broker no longer holds its message"]
    assert relay_queued_jobs(unit_db, settings, queues) == []  # now held (and marked just now)


def test_relay_counts_a_delivery_only_while_a_worker_would_have_begun(
    unit_db: Database, fault_stack: FaultStack, broker_prefix: str
) -> None:
    """A real kombu consumer takes the message and never acknowledges it (a worker that died
    after receiving it): held at first, presumed lost once older than the grace period."""
    settings = relay_settings(fault_stack, broker_prefix)
    queues = Queues(settings)
    old = utcnow() - timedelta(seconds=30)
    job_id = add_job(unit_db, enqueued_at=old)
    with unit_db.write() as s:
        s.execute(update(Job).where(Job.id != job_id).values(state="FAILED"))
    queues.send_job(job_id, "cpu")
    got: list[Any] = []
    queue = next(q for q in queues.celery.conf.task_queues if q.name == "cpu")
    with queues.celery.connection_for_read() as conn, conn.channel() as channel:
        consumer = Consumer(channel, queues=[queue], callbacks=[lambda _, m: got.append(m)], accept=["json"])
        consumer.qos(prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=10)
            assert len(got) == 1
            held = queues.held_messages()
            assert held is not None and job_id not in held.waiting and job_id in held.delivered
            assert relay_queued_jobs(unit_db, settings, queues) == []  # a worker has it (for now)
            time.sleep(settings.relay_grace_s + 0.2)
            assert relay_queued_jobs(unit_db, settings, queues) == [job_id]  # its worker is presumed dead
            assert job_id in queued_ids(queues)
            got[0].ack()


def test_the_embedded_broker_on_a_unix_socket_is_used_and_inspected(tmp_path: Path) -> None:
    """`kdq serve`'s Redis listens only on a socket in the data dir: kombu sends to it and the
    relay's inspection reads it through the same settings."""
    from service.embedded.layout import Layout
    from service.embedded.redis import EmbeddedRedis

    layout = Layout(tmp_path / "data")
    layout.prepare()
    server = EmbeddedRedis(layout)
    server.prepare()
    proc = server.start(layout.logs / "redis.log")
    try:
        deadline = time.monotonic() + 10
        while not server.ready():
            assert proc.poll() is None and time.monotonic() < deadline, layout.logs.joinpath("redis.log").read_text()
            time.sleep(0.02)
        settings = Settings(data_dir=layout.root, database_url=UNUSED_DB)
        assert settings.broker_url == f"redis+socket://{layout.redis_socket}"
        queues = Queues(settings)
        queues.send_job("job_embedded", "cpu")
        held = queues.held_messages()
        assert "job_embedded" in held.waiting and not held.holds("job_other")
        got: list[Any] = []
        queue = next(q for q in queues.celery.conf.task_queues if q.name == "cpu")
        with queues.celery.connection_for_read() as conn, conn.channel() as channel:
            with Consumer(channel, queues=[queue], callbacks=[lambda _, m: got.append(m)]):
                conn.drain_events(timeout=10)
            assert len(got) == 1
            held = queues.held_messages()
            assert "job_embedded" not in held.waiting and held.holds("job_embedded", delivered_within=60)
    finally:
        proc.kill()
        proc.wait(10)


def test_a_failed_ack_frees_the_workers_prefetch_slot(tmp_path: Path) -> None:
    """Redis restarts while a task runs, so acknowledging its message fails: the slot must still
    be freed. (kombu's own Redis transport keeps it taken; with prefetch 1 the worker then never
    polls Redis again, never notices the dead connection, and idles forever.)"""
    broker = PrivateRedis(tmp_path)
    try:
        queues = Queues(Settings(database_url=UNUSED_DB, broker_url=broker.url))
        queues.send_job("job_running", "cpu")
        got: list[Any] = []
        queue = next(q for q in queues.celery.conf.task_queues if q.name == "cpu")
        with queues.celery.connection_for_read() as conn, conn.channel() as channel:
            assert isinstance(channel.qos, redis_transport.QoS)
            consumer = Consumer(channel, queues=[queue], callbacks=[lambda _, m: got.append(m)])
            consumer.qos(prefetch_count=1)
            with consumer:
                conn.drain_events(timeout=10)
                assert len(got) == 1 and not channel.qos.can_consume()
                broker.kill()
                with pytest.raises(conn.connection_errors):
                    got[0].ack()
                assert channel.qos.can_consume()
    finally:
        broker.close()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Any:
    before = set(threading.enumerate())
    yield
    for t in set(threading.enumerate()) - before:
        if t.name.startswith("heartbeat-"):
            t.join(5)
