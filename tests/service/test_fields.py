"""Fields of use through the real API and workers: a forecaster from a CSV time series, a policy from
logged observations; each upload checked, each job judged by its field's metric."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import soundfile as sf
import torch

from bench.field_cases import (
    AUDIO_LENGTH,
    AUDIO_RATE,
    audio_problem,
    forecast_problem,
    policy_problem,
)
from worker.compression.io.teachers import load_teacher

from .flows import ready_upload, submit, upload, wait_job, wait_upload

FAST = {
    "student": {"kind": "zoo", "architecture": {"architecture": "mlp", "hidden": [64, 64]}},
    "distillation": {"epochs": 8, "batch_size": 64, "lr": 3e-3, "baseline": False},
    "quantization": {"method": "none"},
    "evaluation": {"latency_batch_sizes": [1, 32], "warmup": 1, "repeats": 5, "disagreements": 2},
}
SERIES = {"task": "forecasting", "time_column": "ts", "target_columns": "load", "feature_columns": '["temp"]',
          "window": "48", "horizon": "12"}


def _zip(folder: Path) -> Path:
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return archive


def _report(api: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    return api.get(f"/v1/jobs/{job['id']}/metrics").json()


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row["metric"] for row in report["models"]}


def test_a_forecaster_is_distilled_from_a_csv_series(api: httpx.Client, tmp_path: Path) -> None:
    made = forecast_problem(tmp_path / "series", n=2000, epochs=200)
    teacher = ready_upload(api, "models", _zip(made["teacher"]))
    data = ready_upload(api, "datasets", made["data"], **SERIES)
    summary = data["summary"]
    assert summary["field"] == "forecasting" and summary["inputs"]["x"] == [2, 48]
    assert summary["target_shape"] == [12] and summary["samples"] == 2000 - 60 + 1

    r = submit(api, {**FAST, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = _report(api, job)
    assert report["primary_metric"] == "mae" and report["delivery"]["metric"] == "mae"
    assert report["delivery"]["tolerance_means"] == "MAE within +5% of the teacher's"
    assert report["data"]["eval"]["split"] == "chronological"
    rows = _rows(report)
    for name in ("teacher", "student"):
        assert {"mae", "mape", "smape"} <= set(rows[name]), rows[name]
    teacher_mae, student_mae = rows["teacher"]["mae"], rows["student"]["mae"]
    naive = 8.0  # repeating the last load scores an MAE of about 8.6 on this series
    assert teacher_mae < naive / 4 and student_mae < 1.5 * teacher_mae, rows

    # the bundle's predict.py forecasts from the raw CSV: the steps after its last window, as the teacher would
    body = api.get(f"/v1/jobs/{job['id']}/artifacts/bundle.zip")
    assert body.status_code == 200
    (tmp_path / "bundle.zip").write_bytes(body.content)
    with zipfile.ZipFile(tmp_path / "bundle.zip") as zf:
        zf.extractall(tmp_path / "bundle")
    out = subprocess.run([sys.executable, "predict.py", str(made["data"])], cwd=tmp_path / "bundle",
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.splitlines()[0])
    forecast = answer["forecast"]["load"]
    series = pd.read_csv(made["data"])
    last = torch.tensor(series[["load", "temp"]].to_numpy()[-48:].T.reshape(1, -1), dtype=torch.float32)
    expected = load_teacher(made["teacher"]).predict({"x": last})[0].tolist()
    assert len(forecast) == 12 and sum(abs(a - b) for a, b in zip(forecast, expected, strict=True)) / 12 < 2.0


def test_bad_series_uploads_and_jobs_say_why(api: httpx.Client, tmp_path: Path) -> None:
    made = forecast_problem(tmp_path / "series", n=400, epochs=1)
    r = upload(api, "datasets", made["data"], **{**SERIES, "target_columns": "price"})
    assert r.status_code == 201, r.text
    body = wait_upload(api, "datasets", r.json()["id"])
    assert body["state"] == "invalid" and "no column 'price'" in body["error"]["detail"], body
    r = upload(api, "datasets", made["data"], **{**SERIES, "window": "400"})
    body = wait_upload(api, "datasets", r.json()["id"])
    assert body["state"] == "invalid" and "too short" in body["error"]["detail"], body
    r = upload(api, "datasets", made["data"], task="forecasting", window="4")
    assert r.status_code == 422 and "target_columns" in r.text, r.text

    teacher = ready_upload(api, "models", _zip(made["teacher"]))
    other = ready_upload(api, "datasets", made["data"], **{**SERIES, "horizon": "6"})  # 6 steps; the teacher gives 12
    r = submit(api, {**FAST, "teacher_model_id": teacher["id"], "dataset_id": other["id"]})
    assert r.status_code == 422 and "12 outputs" in r.text, r.text


def test_a_policy_is_distilled_from_logged_observations(api: httpx.Client, tmp_path: Path) -> None:
    made = policy_problem(tmp_path / "policy", n=3000, epochs=200)
    teacher = ready_upload(api, "models", _zip(made["teacher"]))
    data = ready_upload(api, "datasets", made["data"], task="policy", action_space="discrete",
                        action_columns="action", env="CartPole-v1", episodes="5")
    assert data["summary"]["field"] == "policy" and data["summary"]["inputs"]["x"] == [4]

    spec = {**FAST, "student": {"kind": "zoo", "architecture": {"architecture": "mlp", "hidden": [32]}}}
    r = submit(api, {**spec, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = _report(api, job)
    assert report["primary_metric"] == "agreement"
    rows = _rows(report)
    assert rows["teacher"]["agreement"] == 1.0 and rows["student"]["agreement"] >= 0.95, rows
    policy = report["policy"]
    assert policy["env"] == "CartPole-v1" and policy["episodes"] == 5
    assert policy["returns"]["teacher"]["mean"] >= 475, policy  # the teacher balances
    assert policy["returns"]["student"]["mean"] >= 400, policy

    r = submit(api, {**spec, "teacher_model_id": teacher["id"], "dataset_id": data["id"],
                     "distillation": {**FAST["distillation"], "target": {"metric": "agreement", "min": 0.9}}})
    assert r.status_code == 422 and "target/metric" in r.text, r.text  # reported, no target


def test_an_audio_classifier_takes_waveforms(api: httpx.Client, tmp_path: Path) -> None:
    made = audio_problem(tmp_path / "audio", per_class=30, epochs=15)
    teacher = ready_upload(api, "models", _zip(made["teacher"]))
    data = ready_upload(api, "datasets", made["data"], sample_rate=str(AUDIO_RATE))  # format told by its members
    assert data["format"] == "audio_zip" or data["summary"]["format"] == "audio_zip", data
    assert data["summary"]["inputs"]["x"] == [1, 8000] and data["summary"]["classes"] == ["chirp", "high", "low"]

    spec = {**FAST, "student": {"kind": "auto", "max_params_ratio": 0.3}, "quantization": {"method": "dynamic_int8"}}
    r = submit(api, {**spec, "teacher_model_id": teacher["id"], "dataset_id": data["id"],
                     "data": {"audio_length": 8000}})
    assert r.status_code == 422 and "takes clips of 4000 samples" in r.text, r.text
    r = submit(api, {**spec, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})  # the teacher's 0.5 s
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    report = _report(api, job)
    assert report["data"]["eval"]["audio_length"] == AUDIO_LENGTH and report["data"]["eval"]["sample_rate"] == 8000
    rows = _rows(report)
    assert rows["teacher"]["accuracy"] >= 0.9 and rows["student"]["accuracy"] >= 0.9, rows

    # the bundle's predict.py classifies a WAV file as it is recorded (44.1 kHz stereo, 1 s: resampled and cut)
    body = api.get(f"/v1/jobs/{job['id']}/artifacts/bundle.zip")
    (tmp_path / "bundle.zip").write_bytes(body.content)
    with zipfile.ZipFile(tmp_path / "bundle.zip") as zf:
        zf.extractall(tmp_path / "bundle")
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 1500 * t)
    sf.write(tmp_path / "tone.wav", np.stack([tone, tone], 1).astype(np.float32), 44100)
    out = subprocess.run([sys.executable, "predict.py", str(tmp_path / "tone.wav")], cwd=tmp_path / "bundle",
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0])["class"] == "high", out.stdout


def test_list_options_reach_the_form_from_curl_and_the_sdk() -> None:
    from kdq.client import _form_value
    from service.api.routes.uploads import DatasetForm

    for sent in (_form_value(["load", "price"]), "load,price", '["load", "price"]'):
        form = DatasetForm.model_validate({"task": "forecasting", "target_columns": sent, "window": "4",
                                           "horizon": "2"})
        assert form.target_columns == ["load", "price"]
