"""``kdq compress`` against the Postgres + Redis stack: a whole job from one command, a rerun
that resumes, and the exit status and message of each way it can end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .assets import EXPECTED_ARTIFACTS, FAST_SPEC
from .conftest import REPO, Stack, free_port


def kdq_client(*args: str) -> list[str]:
    """The ``kdq`` command's client half (the `kdq` package), as the console script runs it."""
    return [sys.executable, "-m", "kdq", *args]


def compress(stack: Stack, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = kdq_client("compress", "--url", stack.url, "--key", key or stack.key or "", *args)
    return subprocess.run(argv, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=300)


def test_one_command_uploads_runs_follows_and_downloads_checked_artifacts(
    pg_stack: Stack, assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = ["--spec", json.dumps(FAST_SPEC), "--out", str(out), "--idempotency-key", "client-test-1",
              "--allow-do-not-ship"]  # (the tiny job's verdict may be do_not_ship: exit 4 without it)
    done = compress(pg_stack, "--teacher", str(assets["teacher"]), "--teacher-format", "zoo_zip",
                    "--data", str(assets["data"]), "--data-format", "npz", *common)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["summary"], result
    assert "[distill]" in done.stderr and f"job {result['job_id']} SUCCEEDED" in done.stderr
    with pg_stack.client() as client:
        job = client.get(f"/v1/jobs/{result['job_id']}").json()
        listed = {a["name"]: a["sha256"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    assert set(listed) == EXPECTED_ARTIFACTS and {p.name for p in out.iterdir()} == EXPECTED_ARTIFACTS
    for name, sha in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha

    # a rerun with the same uploads and key finds the same job and keeps the files it has
    (out / "report.html").write_bytes(b"damaged")
    again = compress(pg_stack, "--teacher", job["teacher_model_id"], "--data", job["dataset_id"], *common)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["job_id"] == result["job_id"]
    assert again.stderr.count("already there") == len(EXPECTED_ARTIFACTS) - 1
    assert hashlib.sha256((out / "report.html").read_bytes()).hexdigest() == listed["report.html"]


def test_a_failed_job_exits_1_with_its_problem(pg_stack: Stack, pg_uploads: dict[str, Any], tmp_path: Path) -> None:
    spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "device": "cuda"}}
    done = compress(pg_stack, "--teacher", pg_uploads["teacher"]["id"], "--data", pg_uploads["dataset"]["id"],
                    "--spec", json.dumps(spec), "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "FAILED" in done.stderr and "GPU" in done.stderr
    error = json.loads(done.stdout)  # the problem as JSON on stdout too
    assert error["state"] == "FAILED" and "GPU" in error["error"]["detail"] and error["error"]["exit_code"] == 1
    assert not (tmp_path / "out").exists()


def test_a_refused_spec_exits_2_naming_the_bad_field(pg_stack: Stack, pg_uploads: dict[str, Any]) -> None:
    spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": -1}}
    done = compress(pg_stack, "--teacher", pg_uploads["teacher"]["id"], "--data", pg_uploads["dataset"]["id"],
                    "--spec", json.dumps(spec))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "HTTP 422" in done.stderr and "/distillation/epochs" in done.stderr
    problem = json.loads(done.stdout)["error"]
    assert problem["status"] == 422 and problem["errors"][0]["pointer"] == "#/distillation/epochs"


def test_an_invalid_upload_exits_2_with_the_reason(pg_stack: Stack, assets: dict[str, Path]) -> None:
    done = compress(pg_stack, "--teacher", str(assets["truncated"]), "--teacher-format", "zoo_zip",
                    "--data", str(assets["data"]))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "model" in done.stderr and ("invalid" in done.stderr or "HTTP 422" in done.stderr)


def test_a_wrong_key_exits_2_and_no_service_exits_3(pg_stack: Stack, assets: dict[str, Path]) -> None:
    args = ["--teacher", str(assets["teacher"]), "--data", str(assets["data"])]
    refused = compress(pg_stack, *args, key="kdq_nope_nope")
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr, refused.stderr
    assert json.loads(refused.stdout)["error"]["status"] == 401
    gone = subprocess.run(
        kdq_client("compress", "--url", f"http://127.0.0.1:{free_port()}", *args),
        cwd=REPO, env=pg_stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == 3 and "cannot reach" in gone.stderr, gone.stderr
    assert json.loads(gone.stdout)["error"]["exit_code"] == 3
