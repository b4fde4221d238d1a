"""A Hugging Face token classifier (NER) through the real API and workers: the folder zipped and uploaded
as an ``hf_zip``, a JSON Lines file of tagged sentences, a derived student; the job ends with entity F1 in
its metrics and a verdict. A tag the teacher does not know is a 422 at submission, naming it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx

from bench.field_ner import TAGS, ner_problem, sentences, write_jsonl

from .flows import ready_upload, submit, wait_job

JOB = {
    "student": {"kind": "derived", "num_layers": 2},
    "distillation": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "baseline": False},
    "quantization": {"method": "dynamic_int8"},
    "evaluation": {"latency_batch_sizes": [1, 16], "warmup": 1, "repeats": 3, "disagreements": 2},
}


def test_a_token_classifier_is_uploaded_checked_and_distilled(api: httpx.Client, tmp_path: Path) -> None:
    made = ner_problem(tmp_path / "ner", sentences_n=200, steps=150, novel=0.0)
    archive = tmp_path / "ner.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(made["teacher"].iterdir()):
            zf.write(f, f.name)
    teacher = ready_upload(api, "models", archive)
    assert teacher["format"] == "hf_zip", teacher
    summary = teacher["summary"]
    assert summary["task"] == "token_classification" and summary["input_kind"] == "tokens"
    assert summary["classes"] == list(TAGS)
    data = ready_upload(api, "datasets", made["data"])
    assert data["summary"]["labels"] == "per_word" and set(data["summary"]["classes"]) == set(TAGS)

    rows = sentences(10)
    rows[2] = {"tokens": ["zeus", "smiled"], "tags": ["B-GOD", "O"]}
    odd = ready_upload(api, "datasets", write_jsonl(tmp_path / "odd.jsonl", rows))
    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": odd["id"]})
    assert r.status_code == 422 and "B-GOD" in r.text, r.text

    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": data["id"],
                     "distillation": {**JOB["distillation"], "target": {"metric": "accuracy", "min": 0.9}}})
    assert r.status_code == 422 and "accuracy does not measure a token_classification model" in r.text, r.text

    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": data["id"], "student": {"kind": "search"},
                     "targets": {"metric": "entity_f1", "max_drop": 0.02}})
    assert r.status_code == 422 and "search over token classification" in r.text, r.text

    r = submit(api, {**JOB, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert report["primary_metric"] == "entity_f1"
    models = {m["name"]: m for m in report["models"]}
    assert models["teacher"]["metric"]["entity_f1"] > 0.7
    assert 0.0 <= models["int8"]["metric"]["entity_f1"] <= 1.0
    assert report["summary"]["verdict"] in ("ship", "ship_with_caution", "do_not_ship")
    assert report["student"]["config"]["num_hidden_layers"] == 2
