"""``kdq`` client commands against the Postgres + Redis stack, as a stranger ran them: a rerun as
another quantization method with ``--set``; an identical ``compress`` rerun under the same
idempotency key (files uploaded again) finds the same job, other files or spec under it are
refused; a ``do_not_ship`` verdict has its own exit status; a closed stdout ends quietly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from kdq.cli.compress import reuse_tag

from .assets import FAST_SPEC, write_dataset
from .conftest import REPO, Stack
from .flows import submit, wait_job


def kdq(stack: Stack, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kdq", *args, "--url", stack.url, "--key", stack.key or ""]
    return subprocess.run(argv, cwd=REPO, env=stack.env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_rerun_set_another_quantization_method_drops_the_old_methods_fields(
    pg_stack: Stack, pg_uploads: dict[str, Any]
) -> None:
    base = {**FAST_SPEC, "teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    with pg_stack.client() as api:
        old = submit(api, {**base, "name": "rerun-static"}).json()["id"]
        wait_job(api, old)
        doc = api.get(f"/v1/jobs/{old}").json()
        assert {"percentile", "calibration"} <= set((doc.get("spec") or doc)["quantization"])  # (the server's defaults)
    done = kdq(pg_stack, "jobs", "rerun", old, "--set", "quantization.method=dynamic_int8", "--json", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    new = json.loads(done.stdout)
    quantization = (new.get("spec") or new)["quantization"]
    assert quantization["method"] == "dynamic_int8", quantization
    assert not {"percentile", "calibration", "calibration_samples"} & set(quantization), quantization


def test_an_identical_compress_rerun_under_one_key_finds_the_same_job(
    pg_stack: Stack, assets: dict[str, Path], tmp_path: Path
) -> None:
    key = f"ci-{uuid.uuid4().hex[:8]}"
    teacher = shutil.copy(assets["teacher"], tmp_path / "teacher.zip")
    data = write_dataset(tmp_path, "data.npz", seed=11)

    def compress(data: Path, spec: dict[str, Any], *more: str) -> subprocess.CompletedProcess[str]:
        return kdq(pg_stack, "compress", "--teacher", str(teacher), "--teacher-format", "zoo_zip", "--data", str(data),
                   "--data-format", "npz", "--spec", json.dumps(spec), "--idempotency-key", key, "--no-download",
                   "--allow-do-not-ship", *more)  # fmt: skip

    first = compress(data, FAST_SPEC, "--quiet")
    assert first.returncode == 0, first.stderr
    again = compress(data, FAST_SPEC)  # the same files, uploaded again by a rerun of the pipeline
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["job_id"] == json.loads(first.stdout)["job_id"]
    assert again.stderr.count("uploaded before under this key; reused") == 2, again.stderr
    with pg_stack.client() as api:
        for kind, role, fmt in (("models", "teacher", "zoo_zip"), ("datasets", "data", "npz")):
            tagged = api.get(f"/v1/{kind}", params={"tag": reuse_tag(key, role, fmt, {})}).json()["items"]
            assert len(tagged) == 1, tagged  # uploaded once, found by the rerun
    # the same key with other data, or another spec: refused, saying why
    other = compress(write_dataset(tmp_path, "other.npz", seed=12), FAST_SPEC, "--quiet")
    spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 1}}
    changed = compress(data, spec, "--quiet")
    for refused in (other, changed):
        assert refused.returncode == 2, refused.stderr
        assert "Idempotency-Key" in refused.stderr and f"--idempotency-key {key!r} was used before" in refused.stderr
        assert json.loads(refused.stdout)["error"]["status"] == 422


def test_a_do_not_ship_verdict_exits_4_with_the_files_downloaded(
    pg_stack: Stack, pg_uploads: dict[str, Any], tmp_path: Path
) -> None:
    spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 1, "lr": 1e-6}}  # learns nothing
    out = tmp_path / "out"
    args = ["compress", "--teacher", pg_uploads["teacher"]["id"], "--data", pg_uploads["dataset"]["id"],
            "--spec", json.dumps(spec), "--out", str(out), "--idempotency-key", f"dns-{uuid.uuid4().hex[:8]}"]  # fmt: skip
    gated = kdq(pg_stack, *args)
    result = json.loads(gated.stdout)
    with pg_stack.client() as api:
        assert api.get(f"/v1/jobs/{result['job_id']}").json()["summary"]["verdict"] == "do_not_ship"
    assert gated.returncode == 4, gated.stderr
    assert result["verdict"] == "do_not_ship" and result["exit_code"] == 4 and result["state"] == "SUCCEEDED"
    assert "verdict is do_not_ship" in gated.stderr and "--allow-do-not-ship" in gated.stderr
    assert (out / "model.onnx").is_file() and {Path(f).name for f in result["files"]} == {p.name for p in out.iterdir()}
    accepted = kdq(pg_stack, *args, "--allow-do-not-ship")  # (the same key: the same job)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["job_id"] == result["job_id"] and "exit_code" not in json.loads(accepted.stdout)


def test_a_closed_stdout_ends_quietly(pg_stack: Stack, pg_uploads: dict[str, Any]) -> None:
    for args in (["uploads", "list"], ["uploads", "list", "--json"], ["jobs", "list"]):
        read, write = os.pipe()
        os.close(read)  # (``| head`` that has already read its lines)
        try:
            done = kdq(pg_stack, *args, stdout=write)
        finally:
            os.close(write)
        assert done.returncode == 141, done.stderr
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
