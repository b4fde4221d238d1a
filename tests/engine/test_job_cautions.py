"""Cautions a finished job gives about its data: inputs of raw 0–255 values for a teacher that
scores better on them divided by 255, and an eval dataset that is the training dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worker.compression.compress import compress
from worker.compression.deliver import as_reported, same_rows
from worker.compression.io.datasets import load_dataset
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.measure.teacher_check import check_teacher
from worker.compression.spec import CompressSpec
from worker.compression.students import zoo

CFG = {"architecture": "mlp", "task": "classification", "input_dim": 16, "hidden": [64, 64], "output_dim": 4}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A teacher trained on pixels in [0, 1] whose classes need a threshold at 0.5 (half of each label:
    lost on raw 0–255 values) and a comparison of two pixels (kept at any scale): on raw values it is
    weak, not at chance. ``raw.npz``: the same pixels as uint8 0–255; ``unit.npz``: in [0, 1]."""
    root = tmp_path_factory.mktemp("cautions")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (800, 16), generator=g).float() / 255
    y = 2 * (x[:, 0] > 0.5).long() + (x[:, 1] > x[:, 2]).long()
    torch.manual_seed(0)
    teacher = zoo.build(CFG)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_zoo_model(teacher.eval(), CFG, root / "teacher")
    np.savez(root / "raw.npz", x=np.round(x.numpy() * 255).astype(np.uint8), y=y.numpy())
    np.savez(root / "unit.npz", x=x.numpy(), y=y.numpy())
    return root


def _checked(problem, name):
    teacher = load_teacher(problem / "teacher")
    data = load_dataset(problem / name, input_shape=teacher.input_shape, task="classification")
    check, _, evald = check_teacher(teacher, data, data, "classification")
    return data, check, evald


def test_the_teacher_check_hints_at_raw_pixels_only_when_dividing_helps(problem):
    raw, check, evald = _checked(problem, "raw.npz")
    assert raw.summary()["value_range"] == "0-255"
    assert check.passed and 0.35 < check.value < 0.8  # weak, above chance
    assert "the inputs range 0–255" in check.detail and "divide x by 255" in check.detail
    assert evald.meta["input_scale_hint"] in check.detail
    unit, check, evald = _checked(problem, "unit.npz")
    assert "value_range" not in unit.summary() and check.value > 0.9
    assert check.detail == "" and "input_scale_hint" not in evald.meta


def test_a_job_on_raw_pixels_evaluated_on_its_training_data_says_both(problem, tmp_path):
    spec = CompressSpec.model_validate({
        "student": {"kind": "auto", "max_params_ratio": 0.5},
        "distillation": {"epochs": 2, "batch_size": 64, "lr": 3e-3},
        "quantization": {"method": "none"},
        "evaluation": {"latency_batch_sizes": [1, 16], "repeats": 2, "warmup": 1},
    })
    res = compress(spec, teacher_path=problem / "teacher", dataset_path=problem / "raw.npz",
                   eval_dataset_path=problem / "raw.npz", output_dir=tmp_path / "out")
    report = json.loads(next(a.path for a in res.artifacts if a.kind == "report_json").read_text())
    reasons = {r["code"]: r for r in report["summary"]["reasons"]}
    assert reasons["input_scale"]["severity"] == "ship_with_caution"
    assert "range 0–255" in reasons["input_scale"]["message"] and "divide x by 255" in reasons["input_scale"]["message"]
    assert "the eval dataset is the training dataset" in reasons["eval_is_training_data"]["message"]
    assert report["summary"]["verdict"] in ("ship_with_caution", "do_not_ship")
    assert report["delivery"]["eval_from"] == "the training dataset itself"


def test_other_eval_rows_are_not_the_training_data(problem):
    data = load_dataset(problem / "unit.npz")
    assert same_rows(data, load_dataset(problem / "unit.npz"))
    train, evald = data.split(0.2, 0)
    assert not same_rows(train, evald) and not same_rows(data, data.subset(list(range(799, -1, -1))))
    seen = {"eval_rows": 160, "noise": 0.01, "eval_given": True, "eval_is_train": False}
    assert as_reported(seen)["eval_from"] == "an eval dataset"
