"""Results a team can ship, through the real API and workers, on teachers and data made the way
their users make them: every finished job delivers a model that is right, or says plainly why not."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import results_assets as ra
from .flows import ready_upload, submit, upload, wait_job, wait_upload

SMALL = {
    "distillation": {"epochs": 15, "batch_size": 64, "lr": 3e-3},
    "evaluation": {"latency_batch_sizes": [1, 64], "warmup": 2, "repeats": 10, "disagreements": 3},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("results")
    return {
        "cancer": ra.breast_cancer(root / "cancer"),
        "digits": ra.digit_pngs(root / "digits"),
        "regression": ra.regression(root / "regression"),
        "mediocre": ra.three_class(root / "mediocre", mediocre=True),
        "useless": ra.three_class(root / "useless", useless=True),
    }


def run(api: httpx.Client, teacher: dict[str, Any], dataset: dict[str, Any], **spec: Any) -> dict[str, Any]:
    r = submit(api, {**SMALL, **spec, "teacher_model_id": teacher["id"], "dataset_id": dataset["id"]})
    assert r.status_code == 202, r.text
    return wait_job(api, r.json()["id"], timeout=300)


def report(api: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    return api.get(f"/v1/jobs/{job['id']}/metrics").json()


def bundle(api: httpx.Client, job: dict[str, Any], into: Path) -> Path:
    body = api.get(f"/v1/jobs/{job['id']}/artifacts/bundle.zip")
    assert body.status_code == 200
    into.mkdir(parents=True, exist_ok=True)
    (into / "bundle.zip").write_bytes(body.content)
    with zipfile.ZipFile(into / "bundle.zip") as zf:
        assert {"model.onnx", "preprocessing.json", "predict.py", "MODEL_CARD.md"} <= set(zf.namelist())
        zf.extractall(into)
    return into


def predict(folder: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, str(folder / "predict.py"), *args], capture_output=True, text=True,
                         timeout=120, cwd=folder)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_string_labels_follow_the_teachers_class_order(api: httpx.Client, made: dict[str, Any], tmp_path: Path) -> None:
    """CSV labels ``benign``/``malignant`` sort the reverse of the teacher's outputs: a teacher that names
    its classes is followed; the bundle's predict.py reproduces the job's accuracy from CSV rows."""
    cancer = made["cancer"]
    teacher = ready_upload(api, "models", cancer["zoo"])
    assert teacher["summary"]["classes"] == ["malignant", "benign"]
    data = ready_upload(api, "datasets", cancer["data"], label_column="label")
    evals = ready_upload(api, "datasets", cancer["eval"], label_column="label")
    r = submit(api, {**SMALL, "teacher_model_id": teacher["id"], "dataset_id": data["id"],
                     "eval_dataset_id": evals["id"]})  # fmt: skip
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job["error"]
    rep = report(api, job)
    assert rep["class_order"] == {"source": "teacher", "classes": ["malignant", "benign"]}
    assert rep["teacher_check"]["passed"] and rep["teacher_check"]["value"] > 0.9
    delivered = rep["summary"]["delivered"]["name"]
    accuracy = next(r for r in rep["models"] if r["name"] == delivered)["metric"]["accuracy"]
    assert accuracy > 0.9 and job["summary"]["verdict"] in ("ship", "ship_with_caution")
    folder = bundle(api, job, tmp_path / "bundle")
    answers = predict(folder, str(cancer["eval"]))
    truth = [line.split(",", 1)[0] for line in cancer["eval"].read_text().splitlines()[1:]]
    got = sum(a["class"] == t for a, t in zip(answers, truth, strict=True)) / len(truth)
    assert abs(got - accuracy) <= 1 / len(truth)  # the same model and preprocessing, outside the service


def test_a_teacher_reversed_against_the_labels_fails_and_names_the_order(api: httpx.Client, made: dict[str, Any]) -> None:
    cancer = made["cancer"]
    teacher = ready_upload(api, "models", cancer["onnx"])  # the same teacher, no class names in the graph
    data = ready_upload(api, "datasets", cancer["data"], label_column="label")
    job = run(api, teacher, data)
    assert job["state"] == "FAILED" and job["error"]["code"] == "teacher_disagrees_with_labels", job
    assert "malignant, benign" in job["error"]["detail"].replace("'", "")  # the order that fits
    again = run(api, teacher, data, data={"classes": ["malignant", "benign"]})  # ... and given, it runs
    assert again["state"] == "SUCCEEDED", again
    # ... or given at upload, as a form field holds it: a JSON list, or names with commas
    named = ready_upload(api, "datasets", cancer["data"], label_column="label", classes='["malignant", "benign"]')
    assert named["options"]["classes"] == ["malignant", "benign"]
    assert ready_upload(api, "datasets", cancer["data"], label_column="label",
                        classes="malignant, benign")["options"]["classes"] == ["malignant", "benign"]  # fmt: skip
    assert run(api, teacher, named)["state"] == "SUCCEEDED"


def test_grayscale_pngs_for_a_default_exported_onnx_teacher_named_image(
    api: httpx.Client, made: dict[str, Any], tmp_path: Path
) -> None:
    """torch's default export (graph + ``model.onnx.data``, zipped) of a 1-channel CNN whose input is
    ``image``, trained on pixels in [0, 1]; PNG files: the job picks grayscale and the pixel scale
    itself, and the delivered model takes ``image`` as the teacher did."""
    digits = made["digits"]
    teacher = ready_upload(api, "models", digits["teacher"])
    assert teacher["format"] == "onnx_zip" and teacher["summary"]["input_names"] == ["image"]
    data = ready_upload(api, "datasets", digits["data"])
    evals = ready_upload(api, "datasets", digits["eval"])
    r = submit(api, {**SMALL, "teacher_model_id": teacher["id"], "dataset_id": data["id"],
                     "eval_dataset_id": evals["id"], "student": {"kind": "auto", "max_params_ratio": 0.6}})  # fmt: skip
    job = wait_job(api, r.json()["id"], timeout=300)
    assert job["state"] == "SUCCEEDED", job["error"]
    assert job["data"]["grayscale"] is True
    rep = report(api, job)
    assert rep["teacher_check"]["image_scale"]["chosen"] == "0-1"
    assert rep["preprocessing"]["input"]["names"] == ["image"] and rep["preprocessing"]["image"]["channels"] == 1
    delivered = rep["summary"]["delivered"]["name"]
    accuracy = next(r for r in rep["models"] if r["name"] == delivered)["metric"]["accuracy"]
    folder = bundle(api, job, tmp_path / "bundle")
    files = sorted(digits["eval_dir"].rglob("*.png"))
    answers = predict(folder, *map(str, files))
    assert [a["input"] for a in answers] == [str(f) for f in files]  # each answer names its file
    got = sum(a["class"] == f.parent.name for a, f in zip(answers, files, strict=True)) / len(files)
    assert abs(got - accuracy) <= 1 / len(files)


def test_an_onnx_regression_teacher_with_one_output(api: httpx.Client, made: dict[str, Any]) -> None:
    reg = made["regression"]
    teacher = ready_upload(api, "models", reg["teacher"])
    assert teacher["summary"]["task"] == "regression" and teacher["summary"]["task_source"] == "inferred"
    data = ready_upload(api, "datasets", reg["data"])
    job = run(api, teacher, data, distillation={**SMALL["distillation"], "epochs": 60})
    assert job["state"] == "SUCCEEDED", job["error"]
    rows = {r["name"]: r for r in report(api, job)["models"]}
    delivered = rows[job["summary"]["delivered"]["name"]]["metric"]
    teacher_mse = rows["teacher"]["metric"]["mse"]
    assert delivered["r2"] > 0.3 and delivered["mse"] < 1.5 * teacher_mse  # not "about predicting 0"
    assert {"mse", "mae", "r2"} <= set(delivered)


def test_a_useless_teacher_is_not_distilled(api: httpx.Client, made: dict[str, Any]) -> None:
    useless = made["useless"]
    teacher = ready_upload(api, "models", useless["teacher"])
    data = ready_upload(api, "datasets", useless["data"])
    job = run(api, teacher, data)
    assert job["state"] == "FAILED" and job["error"]["code"] == "teacher_disagrees_with_labels", job
    assert "no better than chance" in job["error"]["detail"]


def test_a_student_that_loses_to_its_baseline_is_not_delivered(api: httpx.Client, made: dict[str, Any]) -> None:
    """A teacher blind to one of the three deciding features; pure distillation copies its blindness,
    the labels-only baseline does not: the baseline is delivered and the verdict says why."""
    mediocre = made["mediocre"]
    teacher = ready_upload(api, "models", mediocre["teacher"])
    data = ready_upload(api, "datasets", mediocre["data"])
    job = run(api, teacher, data, distillation={**SMALL["distillation"], "alpha": 1.0, "baseline": True})
    assert job["state"] == "SUCCEEDED", job["error"]
    summary = job["summary"]
    assert summary["delivered"]["name"].startswith("baseline"), summary
    assert "below_baseline" in {r["code"] for r in summary["reasons"]}


def test_submission_checks_what_the_uploads_already_say(api: httpx.Client, made: dict[str, Any]) -> None:
    """8 features for a teacher of 16, a class the teacher has no name for: 422 before anything runs."""
    cancer = made["cancer"]
    teacher = ready_upload(api, "models", cancer["zoo"])
    narrow = cancer["data"].parent / "narrow.csv"
    narrow.write_text("\n".join(",".join(line.split(",")[:9]) for line in cancer["data"].read_text().splitlines()))
    data = ready_upload(api, "datasets", narrow, label_column="label")
    r = submit(api, {**SMALL, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 422 and "8 features per sample" in r.text and "takes 30" in r.text, r.text
    renamed = cancer["data"].parent / "renamed.csv"
    renamed.write_text(cancer["data"].read_text().replace("benign", "healthy"))
    data = ready_upload(api, "datasets", renamed, label_column="label")
    r = submit(api, {**SMALL, "teacher_model_id": teacher["id"], "dataset_id": data["id"]})
    assert r.status_code == 422 and "healthy" in r.text, r.text


def test_an_onnx_graph_without_its_data_file_says_how_to_send_both(api: httpx.Client, made: dict[str, Any],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    with zipfile.ZipFile(made["digits"]["teacher"]) as zf:
        zf.extract("model.onnx", tmp_path)
    r = upload(api, "models", tmp_path / "model.onnx", format="onnx")
    assert r.status_code == 201
    body = wait_upload(api, "models", r.json()["id"])
    assert body["state"] == "invalid" and "model.onnx.data" in body["error"]["detail"]
    assert "onnx_zip" in body["error"]["detail"]
