"""End to end over HTTP against real processes: Postgres + Redis + uvicorn + Celery workers,
and the embedded ``kdq serve``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort

from tests.malicious.corpus import torchscript_mlp

from .assets import CLASSES, EXPECTED_ARTIFACTS, FAST_SPEC, FEATURES
from .conftest import FinishedJob, Stack, base_env, free_port, kdq
from .flows import TERMINAL, ready_upload, run_job, sha256_of, submit, wait_job


def check_finished(
    client: httpx.Client,
    job: dict[str, Any],
    events: list[dict[str, Any]],
    polled: list[dict[str, Any]],
    data_path: Path,
) -> None:
    """Everything a client sees of a successful job: states, progress, events, results, files."""
    assert job["state"] == "SUCCEEDED", job
    assert job["error"] is None and job["attempts"] == 1
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
    order = ["QUEUED", "RUNNING", "SUCCEEDED"]
    seen_states = [order.index(p["state"]) for p in polled]
    assert seen_states == sorted(seen_states), "polled states went backwards"
    running = [p for p in polled if p["state"] == "RUNNING" and p["progress"]["total"] > 0]
    for p in running:
        assert 0.0 <= p["progress"]["fraction"] <= 1.0 and p["progress"]["stage"] == p["stage"]

    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["RUNNING", "SUCCEEDED"], states
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "SUCCEEDED"
    stages = {e["data"]["stage"] for e in events if e["event"] == "progress"}
    assert {"load", "distill", "export", "evaluate", "report"} <= stages, stages
    assert any(e["event"] == "log" for e in events)

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert job["summary"] == metrics["summary"]
    summary = metrics["summary"]  # the delivered model, and a verdict with its reasons
    assert summary["final"] == summary["delivered"]["name"] in {"student", "int8"}
    assert summary["verdict"] in ("ship", "ship_with_caution", "do_not_ship")
    assert all({"code", "severity", "message"} <= set(r) for r in summary["reasons"])
    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")

    listing = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    assert {a["name"] for a in listing} == EXPECTED_ARTIFACTS
    files = {}
    for art in listing:
        r = client.get(art["url"])
        assert r.status_code == 200
        assert sha256_of(r.content) == art["sha256"] and len(r.content) == art["size_bytes"]
        assert r.headers["etag"] == f'"{art["sha256"]}"'
        files[art["name"]] = r.content

    session = ort.InferenceSession(files["model_int8.onnx"], providers=["CPUExecutionProvider"])
    x = np.load(data_path)["x"][:8]
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (8, CLASSES) and np.isfinite(out).all()
    ops = {n.op_type for n in onnx.load_from_string(files["model_int8.onnx"]).graph.node}
    assert ops & {"QuantizeLinear", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, ops


def test_job_runs_to_success(pg_stack: Stack, finished_job: FinishedJob, assets: dict[str, Path]) -> None:
    assert finished_job.teacher["summary"]["input_shape"] == [FEATURES]
    assert finished_job.dataset["summary"]["samples"] > 0
    with pg_stack.client() as client:
        check_finished(client, finished_job.job, finished_job.events, finished_job.polled, assets["data"])


def test_sse_resumes_after_last_event_id(pg_stack: Stack, finished_job: FinishedJob) -> None:
    from .flows import sse_events

    events, job_id = finished_job.events, finished_job.job["id"]
    middle = events[len(events) // 2]["id"]
    with pg_stack.client() as client:
        assert sse_events(client, job_id, last_event_id=middle) == [e for e in events if e["id"] > middle]
        done = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(events[-1]["id"])})
        assert done.status_code == 204  # finished and nothing newer: EventSource stops reconnecting


def test_cancel_running_and_queued_jobs(pg_stack: Stack, pg_uploads: dict[str, Any]) -> None:
    long_spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 5000}}
    ids = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    with pg_stack.client() as client:
        running = submit(client, {**long_spec, **ids}).json()["id"]
        job = wait_job(client, running, {"RUNNING", *TERMINAL}, timeout=120)
        deadline = time.monotonic() + 60
        while job["stage"] != "distill" and time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{running}").json()
            time.sleep(0.2)
        assert job["state"] == "RUNNING" and job["stage"] == "distill", job

        # the only job worker is busy: a second job waits in the queue and is cancelled at once
        queued = submit(client, {**FAST_SPEC, **ids}).json()["id"]
        r = client.post(f"/v1/jobs/{queued}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "CANCELLED"

        busy = client.delete(f"/v1/models/{ids['teacher_model_id']}")
        assert busy.status_code == 409 and busy.json()["code"] == "in_use"

        r = client.post(f"/v1/jobs/{running}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "CANCELLING"
        asked = time.monotonic()
        job = wait_job(client, running, timeout=60)
        assert job["state"] == "CANCELLED" and time.monotonic() - asked < 30, job
        assert (
            job["finished_at"] is not None
            and client.get(f"/v1/jobs/{running}/artifacts").json()["items"] == []
        )

        again = client.post(f"/v1/jobs/{running}/cancel")
        assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
        # the queued job's message reaches the worker later and is dropped: it never runs
        time.sleep(1.0)
        late = client.get(f"/v1/jobs/{queued}").json()
        assert late["state"] == "CANCELLED" and late["attempts"] == 0 and late["started_at"] is None


def test_training_failure_ends_failed_with_a_clear_error(pg_stack: Stack, pg_uploads: dict[str, Any]) -> None:
    """This CPU-only worker cannot train on CUDA: the engine refuses at training time."""
    spec = {
        **FAST_SPEC,
        "distillation": {**FAST_SPEC["distillation"], "device": "cuda"},
        "teacher_model_id": pg_uploads["teacher"]["id"],
        "dataset_id": pg_uploads["dataset"]["id"],
    }
    with pg_stack.client() as client:
        r = submit(client, spec)
        assert r.status_code == 202 and r.json()["queue"] == "gpu"
        job = wait_job(client, r.json()["id"], timeout=120)
        assert job["state"] == "FAILED", job
        error = job["error"]
        assert error["code"] == "invalid_spec" and "GPU" in error["detail"], error
        assert "Traceback" not in error["detail"] and 'File "' not in error["detail"]
        assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"] == []
        assert client.get(f"/v1/jobs/{job['id']}/metrics").status_code == 404
        events = client.get(f"/v1/jobs/{job['id']}/events").text
        assert '"state":"FAILED"' in events and '"code":"invalid_spec"' in events


def _pids_with_env(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_embedded_serve_end_to_end(tmp_path: Path, assets: dict[str, Path]) -> None:
    """``kdq serve`` alone (its own PostgreSQL and Redis in the data dir, local store, its own
    workers) passes the same flow and stops every process it started on SIGTERM."""
    port = free_port()
    data_dir = tmp_path / "var"
    marker = f"KDQ_TEST_SERVE={tmp_path.name}"
    env = base_env(KDQ_TEST_SERVE=tmp_path.name, KDQ_ALLOW_CODE_CHECKPOINTS="1")
    stack = Stack(f"http://127.0.0.1:{port}", env, tmp_path)
    stack.spawn(
        "serve",
        kdq("serve", "--no-auth", "--data-dir", str(data_dir), "--port", str(port), "--shutdown-grace", "5"),
    )
    try:
        stack.wait_ready()
        assert len(_pids_with_env(marker)) >= 3  # serve + a worker per queue (+ their pool children)
        with stack.client() as client:
            teacher = ready_upload(client, "models", assets["teacher"], format="auto")
            assert teacher["format"] == "zoo_zip"  # detected by the validating worker
            dataset = ready_upload(client, "datasets", assets["data"])
            job, events, polled = run_job(client, teacher, dataset)
            check_finished(client, job, events, polled, assets["data"])
            # the operator allowed code checkpoints: a TorchScript teacher is validated in the sandbox
            script = ready_upload(client, "models", torchscript_mlp(tmp_path / "script.pt"), format="auto")
            assert script["format"] == "torchscript"
            assert script["summary"]["kind"] == "torchscript" and script["summary"]["input_shape"] == [6]
        assert (data_dir / "postgres" / "PG_VERSION").is_file() and (data_dir / "store" / "sha256").is_dir()
    finally:
        codes = stack.stop(signal.SIGTERM, timeout=40)
    assert codes["serve"] == 0, stack.log_tail()
    deadline = time.monotonic() + 10
    while _pids_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_with_env(marker) == [], "kdq serve left processes behind"


def test_uploads_are_validated_while_a_job_runs(
    pg_stack: Stack, pg_uploads: dict[str, Any], assets: dict[str, Path]
) -> None:
    """While a long job holds the job worker, uploads are still validated (their own queue)."""
    long_spec = {
        **FAST_SPEC,
        "distillation": {**FAST_SPEC["distillation"], "epochs": 5000},
        "teacher_model_id": pg_uploads["teacher"]["id"],
        "dataset_id": pg_uploads["dataset"]["id"],
    }
    with pg_stack.client() as client:
        job_id = submit(client, long_spec).json()["id"]
        try:
            wait_job(client, job_id, {"RUNNING", *TERMINAL}, timeout=120)
            started = time.monotonic()
            for kind, path in (("models", assets["teacher"]), ("datasets", assets["data"])):
                assert ready_upload(client, kind, path)["state"] == "ready"
            assert time.monotonic() - started < 30
            assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "RUNNING"
        finally:
            client.post(f"/v1/jobs/{job_id}/cancel")
            wait_job(client, job_id, timeout=60)
