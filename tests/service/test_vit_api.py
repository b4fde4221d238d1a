"""A Hugging Face ViT image classifier through the real API and workers: the folder zipped and uploaded
as an ``hf_zip``, a zip of PNG class folders, a derived student; the job ends with a verdict and the
teacher's own preprocessing."""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx

from bench.field_vit import CLASSES, vit_problem

from .flows import ready_upload, submit, wait_job

JOB = {
    "student": {"kind": "derived", "num_layers": 2},
    "distillation": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "baseline": False},
    "quantization": {"method": "dynamic_int8"},
    "evaluation": {"latency_batch_sizes": [1, 16], "warmup": 1, "repeats": 3, "disagreements": 2},
}


def test_a_vit_teacher_is_uploaded_checked_and_distilled(api: httpx.Client, tmp_path: Path) -> None:
    made = vit_problem(tmp_path / "vit", size=16, per_class=30, steps=300, hidden_size=32, num_hidden_layers=4,
                       intermediate_size=64)
    archive = tmp_path / "vit.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(made["teacher"].iterdir()):
            zf.write(f, f.name)
    teacher = ready_upload(api, "models", archive)
    assert teacher["format"] == "hf_zip", teacher
    summary = teacher["summary"]
    assert summary["input_kind"] == "image" and summary["input_shape"] == [3, 16, 16]
    assert summary["classes"] == list(CLASSES)
    data = ready_upload(api, "datasets", made["data"])
    assert data["summary"]["classes"] == list(CLASSES)

    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert report["summary"]["verdict"] in ("ship", "ship_with_caution", "do_not_ship")
    assert report["student"]["config"]["model_type"] == "vit" and report["student"]["config"]["num_hidden_layers"] == 2
    assert report["preprocessing"]["image"]["scale"] == "teacher (preprocessor_config.json)"
    assert report["preprocessing"]["image"]["mean"] == [0.5, 0.5, 0.5]
    assert report["quantization"]["method"] == "dynamic_int8"
