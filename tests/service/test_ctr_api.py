"""Click-through (CTR) through the real API and workers: a CSV with string columns uploaded (its
categorical columns found and counted at validation), a zoo ctr teacher, an auto student; the job ends
with AUC and log-loss in its metrics and the vocabularies in its bundle."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx

from bench.field_ctr import ctr_problem

from .flows import ready_upload, submit, upload, wait_job, wait_upload

JOB = {
    "student": {"kind": "auto"},
    "distillation": {"epochs": 4, "batch_size": 64, "lr": 3e-3, "baseline": False},
    "quantization": {"method": "dynamic_int8"},
    "evaluation": {"latency_batch_sizes": [1, 32], "warmup": 1, "repeats": 5, "disagreements": 2},
}


def _zip(folder: Path) -> Path:
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return archive


def test_a_ctr_job_from_a_csv_with_string_columns(api: httpx.Client, tmp_path: Path) -> None:
    made = ctr_problem(tmp_path / "ctr", rows=3000, epochs=3)
    teacher = ready_upload(api, "models", _zip(made["teacher"]))
    assert teacher["summary"]["input_kind"] == "vector" and teacher["summary"]["input_shape"] == [7]
    options = {k: str(v) for k, v in made["spec"].items()}
    data = ready_upload(api, "datasets", made["data"], **options)
    assert data["summary"]["categorical_columns"] == "site,app,hour,user", data["summary"]
    assert data["summary"]["field"] == "ctr"

    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert report["primary_metric"] == "auc" and report["delivery"]["metric"] == "auc"
    rows = {row["name"]: row["metric"] for row in report["models"]}
    for name in ("teacher", "student"):
        assert {"auc", "log_loss"} <= set(rows[name]), rows[name]
    assert rows["teacher"]["auc"] > 0.7 and rows["student"]["auc"] > 0.7, rows
    assert report["summary"]["verdict"] in ("ship", "ship_with_caution", "do_not_ship")

    body = api.get(f"/v1/jobs/{job['id']}/artifacts/bundle.zip")
    assert body.status_code == 200
    with zipfile.ZipFile(io.BytesIO(body.content)) as zf:
        pre = json.loads(zf.read("preprocessing.json"))
    assert [v["column"] for v in pre["tabular"]["categorical"]] == ["site", "app", "hour", "user"]


def test_a_misnamed_categorical_column_is_a_clear_upload_error(api: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("site,price,click\na,1,0\nb,2,1\n")
    r = upload(api, "datasets", path, categorical_columns="site,nope", label_column="click")
    assert r.status_code == 201, r.text
    body = wait_upload(api, "datasets", r.json()["id"])  # read on the validation worker: invalid, naming it
    assert body["state"] == "invalid" and body["error"]["status"] == 422, body
    assert "no categorical column 'nope'" in body["error"]["detail"]
