"""The plain modules, in process: state machine, store, reaper, progress throttling, checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from service.api.jobcheck import check_job
from service.api.pagination import decode_token, encode_token
from service.api.problems import ProblemError, pointer
from service.core.db import Database
from service.core.lifecycle import CancelCheck
from service.core.migrate import upgrade
from service.core.models import Base, Job, JobEvent, utcnow
from service.core.outcomes import jsonable
from service.core.progress import ProgressRecorder
from service.core.reaper import reap_stale_jobs
from service.core.settings import Settings
from service.core.states import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    transition,
)
from service.core.store import LocalStore
from worker.compression.spec import CompressSpec
from worker.compression.types import Progress

from .conftest import REPO
from .rows import add_job

UNUSED_DB = "postgresql+psycopg://unused@/unused"
"""Settings that are never connected (the test passes its own database)."""
TEACHER = {"kind": "zoo", "task": "classification", "input_kind": "vector", "output_dim": 3}
DATASET = {"samples": 100, "input_kind": "vector", "classes": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def pg_db(pg_url: str) -> Database:
    upgrade(pg_url)
    return Database(pg_url)


@pytest.fixture
def db(pg_db: Database) -> Database:
    return pg_db




def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


@pytest.mark.parametrize("current", list(JobState))
def test_transition_table_is_enforced(pg_db: Database, current: JobState) -> None:
    for target in JobState:
        job_id = add_job(pg_db, current)
        with pg_db.write() as s:
            if target in TRANSITIONS.get(current, ()):
                job = transition(s, job_id, target)
                assert job.state == target.value
                assert (job.finished_at is not None) == (target in TERMINAL)
            else:
                with pytest.raises(IllegalTransition):
                    transition(s, job_id, target)
    if current in TERMINAL:
        assert current not in TRANSITIONS


def test_transition_records_a_state_event_and_times(pg_db: Database) -> None:
    job_id = add_job(pg_db)
    with pg_db.write() as s:
        transition(s, job_id, JobState.RUNNING)
    with pg_db.write() as s:
        job = transition(s, job_id, JobState.FAILED, error={"title": "x", "status": 422, "code": "c"})
    assert job.attempts == 1 and job.run_seconds is not None and job.run_seconds >= 0
    with pg_db.read() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    assert [e.data["state"] for e in events] == ["RUNNING", "FAILED"]
    assert events[1].data["previous"] == "RUNNING" and events[1].data["error"]["code"] == "c"


def test_concurrent_transitions_are_serialised(db: Database) -> None:
    """Two workers take the same QUEUED job at once: the row lock lets exactly one win."""
    job_id = add_job(db)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def take() -> None:
        barrier.wait()
        try:
            with db.write() as s:
                transition(s, job_id, JobState.RUNNING)
                time.sleep(0.3)  # hold the lock: without it the other would also read QUEUED
            outcomes.append("won")
        except IllegalTransition as exc:
            outcomes.append(f"lost to {exc.current}")

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost to RUNNING", "won"]
    with db.read() as s:
        assert s.get(Job, job_id).attempts == 1


def test_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    w = store.writer()
    w.write(b"hello ")
    w.write(b"world")
    assert not (tmp_path / "store" / "sha256").exists()  # nothing visible before the commit
    ref = w.commit()
    assert ref.size == 11 and ref.sha256 == "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
    path = store.path(ref.sha256)
    assert path.read_bytes() == b"hello world" and path.stat().st_mode & 0o777 == 0o444
    src = tmp_path / "again.txt"
    src.write_bytes(b"hello world")
    assert store.put_file(src) == ref  # the same content is stored once
    aborted = store.writer()
    aborted.write(b"partial")
    aborted.abort()
    assert list(store.tmp_dir.iterdir()) == []
    linked = store.fetch(ref.sha256, tmp_path / "job" / "input.txt")
    assert linked.read_bytes() == b"hello world" and linked.stat().st_ino == path.stat().st_ino
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_reaper_requeues_fails_and_cancels_stale_jobs(pg_db: Database) -> None:
    settings = Settings(database_url=UNUSED_DB, stale_after_s=60, max_attempts=2)
    old = utcnow() - timedelta(seconds=120)
    requeue = add_job(pg_db, JobState.RUNNING, heartbeat_at=old, attempts=1)
    give_up = add_job(pg_db, JobState.RUNNING, heartbeat_at=old, attempts=2)
    cancel = add_job(pg_db, JobState.CANCELLING, heartbeat_at=old, attempts=1)
    fresh = add_job(pg_db, JobState.RUNNING, heartbeat_at=utcnow(), attempts=1)
    sent: list[tuple[str, str]] = []
    done = reap_stale_jobs(pg_db, settings, lambda job_id, queue: sent.append((job_id, queue)))
    assert done == {requeue: "QUEUED", give_up: "FAILED", cancel: "CANCELLED"}
    assert sent == [(requeue, "cpu")]
    with pg_db.read() as s:
        assert s.get(Job, fresh).state == "RUNNING"
        assert s.get(Job, give_up).error["code"] == "worker_lost"
    assert reap_stale_jobs(pg_db, settings, lambda *_: None) == {}


def test_progress_is_throttled_but_the_last_of_each_stage_is_kept(pg_db: Database) -> None:
    job_id = add_job(pg_db, JobState.RUNNING)
    record = ProgressRecorder(pg_db, job_id, interval=60)
    for step in range(1, 101):
        record(Progress("distill", step, 100, loss=1.0 / step, message="epoch 1" if step == 50 else None))
    record(Progress("export", 0, 2, loss=float("nan")))
    record(Progress("export", 1, 2))
    record.flush()
    with pg_db.read() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        job = s.get(Job, job_id)
    progress = [(e.data["stage"], e.data["step"]) for e in events if e.kind == "progress"]
    assert progress == [("distill", 1), ("distill", 100), ("export", 0), ("export", 1)]
    assert [e.data["message"] for e in events if e.kind == "log"] == ["epoch 1"]
    assert next(e for e in events if e.data.get("stage") == "export").data["loss"] is None  # NaN → null
    assert (job.stage, job.progress_step, job.progress_total) == ("export", 1, 2)


def test_a_stages_first_line_comes_after_the_last_report_of_the_stage_before(pg_db: Database) -> None:
    job_id = add_job(pg_db, JobState.RUNNING)
    record = ProgressRecorder(pg_db, job_id, interval=60)
    record(Progress("export", 0, 2))
    record(Progress("export", 2, 2))
    record(Progress("quantize", 0, 1, message="preparing the graph"))
    record.close()
    with pg_db.read() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    seen = [(e.kind, e.data["stage"], e.data.get("step", e.data.get("message"))) for e in events]
    assert seen == [
        ("progress", "export", 0),
        ("progress", "export", 2),
        ("log", "quantize", "preparing the graph"),
        ("progress", "quantize", 0),
    ]


def test_progress_reports_never_wait_for_the_database(pg_db: Database) -> None:
    """The engine's thread only hands reports over: with the job's row locked by another
    transaction, reporting returns at once, and the rows appear once the lock is gone."""
    job_id = add_job(pg_db, JobState.RUNNING)
    record = ProgressRecorder(pg_db, job_id, interval=0.0)
    with pg_db.write() as other:
        other.execute(select(Job).where(Job.id == job_id).with_for_update())
        record(Progress("distill", 1, 2))  # would block here, were the write made in this thread
        record.log("a line")
        with pg_db.read() as s:
            assert s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all() == []
    record.close()
    with pg_db.read() as s:
        kinds = [e.kind for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
    assert sorted(kinds) == ["log", "progress"]


def test_the_last_reports_are_written_with_the_final_state(db: Database, tmp_path: Path) -> None:
    """`take` hands the unwritten reports to `finish`, which writes them in its own transaction,
    before the state event (a stream ends at that event: nothing may come after it)."""
    from service.core.lifecycle import Fence, finish

    job_id = add_job(db, JobState.RUNNING, attempts=1)
    record = ProgressRecorder(db, job_id, interval=60)  # one write, then none for a minute
    record(Progress("distill", 1, 2))
    deadline = time.monotonic() + 10  # that write made (were the writer thread late, it would take the next too)
    while time.monotonic() < deadline:
        with db.read() as s:
            if s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).first() is not None:
                break
        time.sleep(0.01)
    record(Progress("distill", 2, 2))
    record.log("the engine finished")
    rows = record.take()
    assert ("log", {"stage": "distill", "message": "the engine finished"}) in rows
    record(Progress("export", 0, 1))  # after take: never written
    assert finish(db, LocalStore(tmp_path / "store"), Fence(job_id, 1), JobState.SUCCEEDED, events=rows) is JobState.SUCCEEDED
    record.close()
    with db.read() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    seen = [(e.kind, e.data.get("step", e.data.get("message", e.data.get("state")))) for e in events]
    assert seen == [("progress", 1), ("log", "the engine finished"), ("progress", 2), ("state", "SUCCEEDED")]


def test_reports_kept_while_the_database_is_away_fold_into_each_stages_last() -> None:
    from service.core.progress import fold

    a1, a2, b1 = Progress("distill", 1, 9), Progress("distill", 2, 9), Progress("export", 0, 1)
    line = {"message": "x"}
    batch = [(a1, []), (None, [line]), (a2, [line]), (b1, []), (None, [line])]
    assert fold(batch) == [(a1, []), (a2, [line, line]), (b1, []), (None, [line])]


def test_cancel_check_reads_the_row_at_most_every_interval(pg_db: Database) -> None:
    job_id = add_job(pg_db, JobState.RUNNING)
    check = CancelCheck(pg_db, job_id, interval=0.2)
    assert check() is False
    with pg_db.write() as s:
        transition(s, job_id, JobState.CANCELLING)
    assert check() is False  # within the interval: the cached answer
    time.sleep(0.25)
    assert check() is True and check() is True


def test_jsonable_makes_metrics_storable() -> None:
    import numpy as np

    value = {"a": float("inf"), "b": [np.float32(1.5), (1, 2)], 3: np.int64(4)}
    assert jsonable(value) == {"a": None, "b": [1.5, [1, 2]], "3": 4}


def test_what_the_spec_alone_decides_is_refused_by_the_spec_not_by_the_upload_checks() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nothing to do"):
        CompressSpec.model_validate({"student": None, "quantization": {"method": "none"}})
    with pytest.raises(ValidationError, match="qat"):
        CompressSpec.model_validate({"student": None, "quantization": {"method": "qat"}})


@pytest.mark.parametrize(
    ("change", "teacher", "dataset", "pointers"),
    [
        ({}, TEACHER, DATASET, []),
        ({"task": "regression"}, TEACHER, DATASET, ["#/task"]),
        ({}, TEACHER, {**DATASET, "input_kind": "image"}, ["#/dataset_id"]),
        ({}, TEACHER, {**DATASET, "classes": list("abcdef")}, ["#/dataset_id"]),
        ({"student": {"kind": "derived"}}, {**TEACHER, "kind": "onnx"}, DATASET, ["#/student/kind"]),
        (
            {"distillation": {"target": {"metric": "cosine", "min": 0.9}}},
            TEACHER,
            DATASET,
            ["#/distillation/target/metric"],
        ),
        ({"distillation": {"attention_weight": 1.0}}, TEACHER, DATASET, ["#/distillation/attention_weight"]),
    ],
)
def test_job_checks_point_at_the_field(
    change: dict[str, Any], teacher: dict[str, Any], dataset: dict[str, Any], pointers: list[str]
) -> None:
    errors = check_job(CompressSpec.model_validate(change), teacher, dataset)
    assert [e.pointer for e in errors] == pointers


NER_TEACHER = {"kind": "hf", "task": "token_classification", "input_kind": "tokens", "input_shape": [128],
               "output_dim": 3, "classes": ["O", "B-PER", "I-PER"]}
NER_DATA = {"input_kind": "tokens", "labels": "per_word", "labelled": True, "classes": ["O", "B-PER", "I-PER"]}


@pytest.mark.parametrize(
    ("change", "teacher", "dataset", "pointers"),
    [
        ({}, NER_TEACHER, NER_DATA, []),
        ({"distillation": {"target": {"metric": "entity_f1", "min": 0.9}}}, NER_TEACHER, NER_DATA, []),
        ({}, NER_TEACHER, {**NER_DATA, "classes": ["O", "B-LOC"]}, ["#/dataset_id"]),  # a tag it does not know
        ({}, NER_TEACHER, {**NER_DATA, "labels": None}, ["#/dataset_id"]),  # texts, not tagged words
        ({}, {**NER_TEACHER, "task": "classification"}, NER_DATA, ["#/dataset_id"]),
        ({"distillation": {"target": {"metric": "accuracy", "min": 0.9}}}, NER_TEACHER, NER_DATA,
         ["#/distillation/target/metric"]),
        ({"student": {"kind": "search"}, "targets": {"metric": "entity_f1", "max_drop": 0.01}}, NER_TEACHER,
         NER_DATA, ["#/student/kind"]),
    ],
)
def test_token_classification_job_checks(
    change: dict[str, Any], teacher: dict[str, Any], dataset: dict[str, Any], pointers: list[str]
) -> None:
    errors = check_job(CompressSpec.model_validate(change), teacher, dataset)
    assert [e.pointer for e in errors] == pointers, errors


def test_page_tokens_round_trip_and_reject_junk() -> None:
    when = utcnow()
    assert decode_token(encode_token(when, "job_1")) == (when, "job_1")
    for junk in ("abc", "", encode_token(when, "x")[:-3] + "!!!"):
        with pytest.raises(ProblemError) as info:
            decode_token(junk)
        assert info.value.problem.status == 422 and info.value.problem.errors[0].parameter == "page_token"


def test_pointer_escapes_json_pointer_characters() -> None:
    assert pointer(("distillation", "layer_map", "a/b~c")) == "#/distillation/layer_map/a~1b~0c"
    assert pointer(()) == "#"


def test_openapi_file_is_current() -> None:
    from service.api.openapi import generate

    committed = json.loads((REPO / "openapi" / "openapi.json").read_text())
    assert committed == generate(), "openapi/openapi.json is stale: run python -m service.api.openapi"


def test_http_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; import service.api.app, service.cli; service.api.app.create_app(); "
        "assert 'worker.celery_app' not in sys.modules, 'the API built the worker app'; "
        "import worker.celery_app; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    env = {**os.environ, "KDQ_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_job_reads_are_fresh_until_finished_then_served_from_memory_per_team(
    tmp_path: Path, unit_pg_url: str
) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.deps import current_principal
    from service.core.auth import Principal

    app = create_app(Settings(data_dir=tmp_path, database_url=unit_pg_url, reaper_interval_s=0, auth="none"))
    ctx = app.state.ctx
    job_id = add_job(ctx.db, JobState.RUNNING)
    with ctx.db.write() as s:
        s.get(Job, job_id).spec = CompressSpec.model_validate({}).model_dump(mode="json")
    client = TestClient(app)
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "RUNNING"
    with ctx.db.write() as s:
        transition(s, job_id, JobState.SUCCEEDED, summary={"accuracy": 0.9})
    first = client.get(f"/v1/jobs/{job_id}")  # the change is seen at once: running jobs are never cached
    assert first.headers["content-type"] == "application/json"
    assert first.json()["state"] == "SUCCEEDED" and first.json()["summary"] == {"accuracy": 0.9}
    assert job_id in ctx.finished_jobs
    with ctx.db.write() as s:  # (never happens: a finished row is final) proves the answer is cached
        s.get(Job, job_id).summary = {"accuracy": 0.1}
    assert client.get(f"/v1/jobs/{job_id}").content == first.content
    app.dependency_overrides[current_principal] = lambda: Principal("other")
    other = client.get(f"/v1/jobs/{job_id}")
    assert other.status_code == 404 and other.json()["code"] == "not_found"


def test_log_lines_carry_the_job_and_team_in_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from service.core.logs import configure, job_context

    try:
        configure("json", "INFO")
        log = logging.getLogger("kdq.test")
        with job_context("job_abc", "vision"):
            log.warning("inside %s", "a job")
        log.warning("outside")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert lines[0]["message"] == "inside a job" and lines[0]["job_id"] == "job_abc" and lines[0]["team"] == "vision"
        assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "kdq.test"
        assert "job_id" not in lines[1] and lines[1]["message"] == "outside"
        configure("text", "INFO")
        with job_context("job_abc", "vision"):
            log.warning("again")
        assert capsys.readouterr().err.rstrip().endswith("kdq.test: again [job job_abc, team vision]")
    finally:
        logging.getLogger().handlers.clear()


def test_a_field_of_another_method_is_named_so_not_suggested_as_itself() -> None:
    from service.api.problems import field_errors

    errors = [{"loc": ("body", "quantization", "percentile"), "msg": "Extra inputs are not permitted",
               "type": "extra_forbidden"}]
    [e] = field_errors(errors, known=["percentile", "calibration", "method"])
    assert "did you mean" not in e.detail and "another method" in e.detail
    errors[0]["loc"] = ("body", "quantization", "percentil")
    assert "did you mean 'percentile'?" in field_errors(errors, known=["percentile"])[0].detail


def test_a_rerun_as_another_method_drops_the_old_methods_fields() -> None:
    from kdq.cli.common import set_path
    from kdq.models import merge_change, switch_union

    old = {"quantization": {"method": "static_int8", "calibration": "percentile", "percentile": 99.9},
           "distillation": {"epochs": 3, "lr": 0.001}}
    body = {k: dict(v) for k, v in old.items()}
    set_path(body, "quantization.method", "dynamic_int8")
    switch_union(body, "quantization.method", old)
    assert body["quantization"] == {"method": "dynamic_int8"}
    set_path(body, "distillation.epochs", "5")
    switch_union(body, "distillation.epochs", old)
    assert body["distillation"] == {"epochs": 5, "lr": 0.001}  # an ordinary block is merged
    sdk = {k: dict(v) for k, v in old.items()}
    merge_change(sdk, "quantization", {"method": "dynamic_int8", "per_channel": False})
    merge_change(sdk, "distillation", {"epochs": 7})
    assert sdk["quantization"] == {"method": "dynamic_int8", "per_channel": False}
    assert sdk["distillation"] == {"epochs": 7, "lr": 0.001}


def test_every_422_and_413_has_one_title_whichever_path_raised_it() -> None:
    """'Unprocessable Entity' on some 422s and 'Unprocessable Content' on others (stranger trial)."""
    from service.api.problems import ProblemError

    assert ProblemError(422, "bad").problem.title == "Unprocessable Content"
    assert ProblemError(413, "too big").problem.title == "Content Too Large"
    assert ProblemError(404, "gone").problem.title == "Not Found"
    spec = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text())
    descriptions = {r.get("description") for p in spec["paths"].values() for op in p.values() if isinstance(op, dict)
                    for code, r in op.get("responses", {}).items() if code == "422"}
    assert descriptions == {"Unprocessable Content"}, descriptions
