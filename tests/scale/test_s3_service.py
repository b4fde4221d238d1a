"""The service with its blobs in S3 (moto's server): uploads, jobs, downloads (ranges, ETags,
presigned redirects), retention, and the store unreachable during an upload and while a job
stores its results."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

from tests.faults.scenarios import (
    CHECKPOINT_EVERY,
    LONG_SPEC,
    events_of,
    state_events,
    submit_job,
    wait_jobs,
    wait_training,
)
from tests.service.assets import EXPECTED_ARTIFACTS
from tests.service.flows import upload, wait_upload

from .conftest import S3Stack
from .s3 import keys, multipart_uploads, s3_client

PROBLEM = "application/problem+json"


def blobs(s: S3Stack) -> set[str]:
    return {k.rsplit("/", 2)[-2] + k.rsplit("/", 1)[-1] for k in keys(s.endpoint, s.bucket, "kdq/sha256/")}


def run(s: S3Stack) -> str:
    assert s.uploads is not None
    with s.client() as c:
        job_id = submit_job(c, s.uploads)
        final = wait_jobs(c, [job_id], 180)[job_id]
    assert final["state"] == "SUCCEEDED", final
    return job_id


def test_a_job_stores_and_serves_its_artifacts_from_s3(s3_stack: S3Stack) -> None:
    job_id = run(s3_stack)
    with s3_stack.client() as c:
        listing = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
        assert {a["name"] for a in listing} == EXPECTED_ARTIFACTS
        assert {a["sha256"] for a in listing} <= blobs(s3_stack)
        redirected = passed = 0
        for art in listing:
            r = c.get(art["url"])
            if art["size_bytes"] >= 64 << 10:  # KDQ_S3_PRESIGN_MIN_BYTES: a presigned redirect
                assert r.status_code == 307, r.text
                assert r.headers["etag"] == f'"{art["sha256"]}"'
                body = httpx.get(r.headers["location"]).content
                redirected += 1
            else:
                assert r.status_code == 200 and r.headers["etag"] == f'"{art["sha256"]}"'
                assert r.headers["content-length"] == str(art["size_bytes"])
                body = r.content
                passed += 1
                ranged = c.get(art["url"], headers={"Range": "bytes=3-9"})
                assert ranged.status_code == 206 and ranged.content == body[3:10]
                assert ranged.headers["content-range"] == f"bytes 3-9/{art['size_bytes']}"
                stale = c.get(art["url"], headers={"Range": "bytes=3-9", "If-Range": '"other"'})
                assert stale.status_code == 200 and stale.content == body
                bad = c.get(art["url"], headers={"Range": f"bytes={art['size_bytes'] + 5}-"})
                assert bad.status_code == 416 and bad.headers["content-type"] == PROBLEM
            assert hashlib.sha256(body).hexdigest() == art["sha256"]
            again = c.get(art["url"], headers={"If-None-Match": f'"{art["sha256"]}"'})
            assert again.status_code == 304
        assert redirected and passed, (redirected, passed)
    # a finished job leaves no checkpoints and no staged uploads behind
    assert keys(s3_stack.endpoint, s3_stack.bucket, f"kdq/checkpoints/{job_id}/") == []
    assert keys(s3_stack.endpoint, s3_stack.bucket, "kdq/staging/") == []


def _npz_of(path: Path, mib: int, *, objects: bool = False) -> Path:
    """An .npz over several S3 parts; ``objects``: an object array in the middle of it."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {"x0": rng.random(mib * 131072 // 3)}
    if objects:  # past the first and before the last part: only the mirror's prefetch reads it
        arrays["x0b"] = np.array([{"a": 1}, None], dtype=object)
    arrays |= {f"x{i}": rng.random(mib * 131072 // 3) for i in (1, 2)}
    arrays["y"] = rng.integers(0, 3, 16)
    np.savez(path, **arrays)
    return path


def test_large_uploads_stream_through_s3_and_are_checked_on_a_bounded_mirror(
    s3_stack: S3Stack, tmp_path: Path
) -> None:
    """Over five 5 MiB parts: accepted with the right sha256; the same with an object array in
    the middle member is refused (422) from the bytes the mirror fetched, and nothing is kept."""
    good = _npz_of(tmp_path / "good.npz", 24)
    before = blobs(s3_stack)
    with s3_stack.client() as c:
        r = upload(c, "datasets", good, format="npz")
        assert r.status_code == 201, r.text
        assert r.json()["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
        assert r.json()["sha256"] in blobs(s3_stack)
        bad = _npz_of(tmp_path / "bad.npz", 24, objects=True)
        r = upload(c, "datasets", bad, format="npz")
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, r.text
        assert "Python objects" in r.json()["detail"]
    assert blobs(s3_stack) == before | {hashlib.sha256(good.read_bytes()).hexdigest()}
    assert keys(s3_stack.endpoint, s3_stack.bucket, "kdq/staging/") == []
    mirrors = list((Path(s3_stack.stack.env["KDQ_DATA_DIR"]) / "s3-staging").glob("*"))
    assert mirrors == []


def _slow_body(path: Path, boundary: str, cut_after: int, cut: threading.Event) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"format\"\r\n\r\nnpz\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.npz\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    sent = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
            sent += len(chunk)
            if sent >= cut_after and not cut.is_set():
                cut.set()
                time.sleep(1.0)  # the gate is cut meanwhile
    yield f"\r\n--{boundary}--\r\n".encode()


def test_store_unreachable_during_an_upload_is_a_503_and_nothing_half_written_is_listed(
    s3_stack: S3Stack, tmp_path: Path
) -> None:
    data = _npz_of(tmp_path / "d.npz", 20)
    before_blobs = blobs(s3_stack)
    cut = threading.Event()
    boundary = "kdq-s3-cut"

    def cutter() -> None:
        cut.wait(60)
        s3_stack.gate.cut()

    threading.Thread(target=cutter, daemon=True).start()
    try:
        with s3_stack.client() as c:
            before_models = c.get("/v1/datasets").json()["items"]
            r = c.post("/v1/datasets", content=_slow_body(data, boundary, 11 << 20, cut),
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == PROBLEM and r.json()["code"] == "store_unavailable"
            assert r.headers["retry-after"].isdigit()
    finally:
        s3_stack.gate.restore()
    with s3_stack.client() as c:
        assert c.get("/v1/datasets").json()["items"] == before_models
    assert blobs(s3_stack) == before_blobs
    assert keys(s3_stack.endpoint, s3_stack.bucket, "kdq/staging/") == []  # nothing listed
    # what the unreachable store kept (an unfinished multipart upload) is swept away
    from service.core.s3store import S3Store

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store(f"s3://{s3_stack.bucket}/kdq", tmp_dir=tmp_path / "s", addressing_style="path")
    store.client = s3_client(s3_stack.endpoint)
    store.sweep_staging(older_than_s=0)
    assert multipart_uploads(s3_stack.endpoint, s3_stack.bucket) == []
    with s3_stack.client() as c:  # and once the store answers again, uploads go through (a client honours Retry-After)
        for _ in range(10):
            r = upload(c, "datasets", data, format="npz")
            if r.status_code != 503:
                break
            time.sleep(min(2.0, float(r.headers["retry-after"])))
        assert r.status_code == 201, r.text


def test_store_unreachable_while_a_job_finishes_it_retries_and_succeeds(s3_stack: S3Stack) -> None:
    with s3_stack.client() as c:
        job_id = submit_job(c, s3_stack.uploads, LONG_SPEC)  # type: ignore[arg-type]
        wait_training(c, job_id, CHECKPOINT_EVERY)
        s3_stack.gate.cut()
        try:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if any("unreachable" in m for m in log_messages(s3_stack, job_id)):
                    break
                assert job["state"] not in ("FAILED", "SUCCEEDED"), job
                time.sleep(0.5)
            else:
                raise AssertionError("the job never found the store unreachable")
            time.sleep(2)
        finally:
            s3_stack.gate.restore()
        final = wait_jobs(c, [job_id], 180)[job_id]
        assert final["state"] == "SUCCEEDED" and final["attempts"] == 1, final
        assert state_events(events_of(c, job_id)) == ["RUNNING", "SUCCEEDED"]
        listing = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
        assert {a["name"] for a in listing} == EXPECTED_ARTIFACTS
        assert {a["sha256"] for a in listing} <= blobs(s3_stack)


def log_messages(s: S3Stack, job_id: str) -> list[str]:
    """The log lines the job has written so far (from its rows: the event stream of a running job
    does not end)."""
    with psycopg.connect(s.db_url.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute("SELECT data->>'message' FROM job_events WHERE job_id = %s AND kind = 'log'",
                            (job_id,)).fetchall()  # fmt: skip
    return [r[0] for r in rows if r[0]]


def test_retention_deletes_an_object_only_once_nothing_refers_to_it(s3_stack: S3Stack, tmp_path: Path) -> None:
    data = tmp_path / "same.npz"
    np.savez(data, x=np.arange(64, dtype=np.float32).reshape(16, 4), y=np.arange(16) % 2)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    with s3_stack.client() as c:
        first = upload(c, "datasets", data, format="npz").json()
        second = upload(c, "datasets", data, format="npz").json()
        wait_upload(c, "datasets", first["id"])
        wait_upload(c, "datasets", second["id"])
        assert sha in blobs(s3_stack)
        old = datetime.now(UTC) - timedelta(days=400)
        with psycopg.connect(s3_stack.db_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("UPDATE datasets SET created_at = %s WHERE id = %s", (old, first["id"]))
        _until(lambda: c.get(f"/v1/datasets/{first['id']}").status_code == 404)
        assert sha in blobs(s3_stack)  # the second upload still refers to it
        assert c.delete(f"/v1/datasets/{second['id']}").status_code == 204
        _until(lambda: sha not in blobs(s3_stack))


def _until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.25)


def test_metrics_show_queue_ages_worker_heartbeats_and_stage_durations(s3_stack: S3Stack) -> None:
    run(s3_stack)
    with s3_stack.client() as c:
        text = c.get("/metrics").text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    for queue in ("validate", "cpu", "gpu"):
        assert any(ln.startswith(f'kdq_queue_oldest_age_seconds{{queue="{queue}"}}') for ln in lines), queue
    beats = [ln for ln in lines if ln.startswith("kdq_worker_heartbeat_age_seconds{")]
    assert any('queues="cpu,gpu"' in ln for ln in beats) and any('queues="validate"' in ln for ln in beats), beats
    assert 'kdq_workers{queue="cpu"} 1.0' in lines
    for stage in ("queue_wait", "fetch_inputs", "distill", "store_results"):
        count = [ln for ln in lines if ln.startswith(f'kdq_job_stage_seconds_count{{stage="{stage}"}}')]
        assert count and float(count[0].split()[-1]) >= 1, (stage, count)
