"""The auto student is timed against the teacher before training (students.speed_fit, issue 13)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from worker.compression.compress import compress
from worker.compression.errors import SpecError
from worker.compression.io.teachers import save_zoo_model
from worker.compression.spec import CompressSpec
from worker.compression.students import zoo
from worker.compression.students.speed_fit import FASTER, fit_speed
from worker.compression.students.student import Student


def fake_student(params: int) -> Student:
    return Student(nn.Identity(), "zoo", {}, None, f"{params} parameters", params, "auto")


def widths_by_budget(sizes: list[int], smallest: int | None = None):
    """A builder: the largest of ``sizes`` within the budget; below ``smallest`` none fits."""
    def build(budget: int) -> Student:
        fitting = [s for s in sizes if s <= budget]
        if not fitting or (smallest is not None and budget < smallest):
            raise SpecError("nothing fits")
        return fake_student(max(fitting))
    return build


def ms_of(times: dict[int, float], teacher_ms: float):
    """(student, teacher) p50 per student, as ``fit_speed`` is given them."""
    return lambda student: (times[student.num_parameters], teacher_ms)


def test_the_budget_student_is_kept_when_it_is_clearly_faster() -> None:
    fit = fit_speed(widths_by_budget([100, 400, 1000]), 1000, ms_of({1000: 4.0}, 10.0), batch=64)
    assert fit.student.num_parameters == 1000 and fit.budget == 1000
    assert fit.record["chosen"] == 0 and len(fit.record["tried"]) == 1
    assert fit.record["teacher_p50_ms"] == 10.0 and fit.record["batch"] == 64


def test_a_slower_student_shrinks_until_one_is_faster_than_the_teacher() -> None:
    times = {1000: 30.0, 400: 12.0, 100: 5.0}
    fit = fit_speed(widths_by_budget([100, 400, 1000]), 1000, ms_of(times, 10.0), batch=64)
    assert fit.student.num_parameters == 100
    assert [t["parameters"] for t in fit.record["tried"]] == [1000, 400, 100]
    assert fit.record["chosen"] == 2 and "2 wider" in fit.record["why"]
    assert times[100] <= FASTER * 10.0
    # the next budget halves the last student's parameters, not the last budget
    assert [t["budget"] for t in fit.record["tried"]] == [1000, 500, 200]


def test_when_shrinking_buys_no_speed_the_widest_is_kept() -> None:
    """Fixed onnxruntime cost: every student takes about the teacher's time, narrower ones no less."""
    times = {1000: 1.0, 400: 0.98, 100: 0.97}
    fit = fit_speed(widths_by_budget([100, 400, 1000]), 1000, ms_of(times, 1.0), batch=64)
    assert fit.student.num_parameters == 1000 and fit.budget == 1000
    assert fit.record["chosen"] == 0 and "widest is kept" in fit.record["why"]


def test_when_none_is_fast_enough_a_clearly_faster_narrowest_is_kept() -> None:
    times = {1000: 30.0, 400: 20.0, 100: 12.0}
    fit = fit_speed(widths_by_budget([100, 400, 1000], smallest=100), 1000, ms_of(times, 10.0), batch=64)
    assert fit.student.num_parameters == 100 and fit.record["chosen"] == 2
    assert "narrowest is the fastest" in fit.record["why"]


def test_no_fitting_student_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="raise the budget"):
        fit_speed(widths_by_budget([1000]), 10, ms_of({}, 1.0), batch=1)


# --- end to end: a black-box CNN whose parameters sit in its dense head ------------------------


class HeavyHeadCNN(nn.Module):
    """What teams write: two small convolutions, then most parameters in a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 6 * 6, 512), nn.ReLU(), nn.Linear(512, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def heavy_head_case(tmp_path_factory):
    """A trained heavy-head CNN exported with torch's ONNX exporter (input named ``image``) and its data."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("heavy_head")
    n = 240
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 24, 24) * 0.3
    x[y == 0, :, :12] += 1.0  # the class is where the bright half is
    x[y == 1, :, 12:] += 1.0
    teacher = HeavyHeadCNN()
    opt = torch.optim.Adam(teacher.parameters(), 3e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    teacher.eval()
    torch.onnx.export(teacher, (x[:2],), str(folder / "teacher.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}}, dynamo=False)
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    return folder


def test_an_auto_student_for_a_cnn_teacher_is_chosen_by_timing_and_the_baseline_is_the_same(
        heavy_head_case, tmp_path) -> None:
    spec = CompressSpec.model_validate({"student": {"kind": "auto"}, "distillation": {"epochs": 1},
                                        "quantization": {"method": "none"},
                                        "evaluation": {"latency_batch_sizes": [1, 32]}})
    res = compress(spec, teacher_path=heavy_head_case / "teacher.onnx", dataset_path=heavy_head_case / "data.npz",
                   output_dir=tmp_path / "out")
    student = res.metrics["student"]
    timing = student["chosen_by_speed"]
    assert timing["batch"] == 32 and timing["teacher_p50_ms"] > 0
    tried = timing["tried"]
    assert tried[0]["budget"] == int(0.25 * res.metrics["teacher"]["num_parameters"])
    assert all(a["parameters"] > b["parameters"] for a, b in itertools.pairwise(tried))  # each narrower
    # this teacher computes little per parameter: the budget's CNN took 13× its time here, so it shrank
    assert tried[0]["p50_ms"] > timing["teacher_p50_ms"] and len(tried) >= 2
    chosen = tried[timing["chosen"]]
    assert chosen["description"] == student["description"]
    assert chosen["p50_ms"] <= FASTER * chosen["teacher_p50_ms"] or "no student tried" in timing["why"]
    # the labels-only baseline is the same student, not the budget's first one
    rows = {r["name"]: r for r in res.metrics["models"]}
    assert rows["baseline"]["parameters"] == rows["student"]["parameters"] == student["num_parameters"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["student"]["chosen_by_speed"] == timing
    html = (tmp_path / "out" / "report.html").read_text()
    assert "chosen by speed at batch 32" in html and tried[0]["description"] in html


def test_an_auto_mlp_student_is_sized_by_parameters_alone(tmp_path) -> None:
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 8, "hidden": [64, 64], "output_dim": 3}
    torch.manual_seed(0)
    teacher = zoo.build(cfg).eval()
    x = torch.randn(200, 8)
    with torch.no_grad():
        y = teacher(x).argmax(1)  # labels the teacher agrees with
    save_zoo_model(teacher, cfg, tmp_path / "teacher")
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    spec = CompressSpec.model_validate({"student": {"kind": "auto"}, "distillation": {"epochs": 1},
                                        "quantization": {"method": "none"}})
    res = compress(spec, teacher_path=tmp_path / "teacher", dataset_path=tmp_path / "data.npz",
                   output_dir=tmp_path / "out")
    assert res.metrics["student"]["chosen_by_speed"] is None
    assert res.metrics["student"]["num_parameters"] <= 0.25 * res.metrics["teacher"]["num_parameters"]


def test_a_teacher_exported_with_a_fixed_batch_is_timed_scored_and_compressed(heavy_head_case, tmp_path) -> None:
    """torch.onnx.export without dynamic axes writes the sample's batch (here 1) into the graph: the
    teacher runs in chunks of it wherever it is timed or scored, and the job delivers."""
    teacher = HeavyHeadCNN()
    teacher.load_state_dict(torch.load(heavy_head_case / "teacher.pt"))  # our own test file: weights only
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(teacher.eval(), (torch.zeros(1, 1, 24, 24),), str(fixed), dynamo=False)
    import onnx

    assert onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    spec = CompressSpec.model_validate({"student": {"kind": "auto"}, "distillation": {"epochs": 1},
                                        "quantization": {"method": "none"},
                                        "evaluation": {"latency_batch_sizes": [1, 32]}})
    res = compress(spec, teacher_path=fixed, dataset_path=heavy_head_case / "data.npz", output_dir=tmp_path / "out")
    rows = {r["name"]: r for r in res.metrics["models"]}
    assert rows["teacher"]["metric"]["accuracy"] > 0.9  # scored in chunks of 1, every row
    assert {b["batch"] for b in rows["teacher"]["latency"]["batches"]} == {1, 32}
    assert res.metrics["student"]["chosen_by_speed"]["teacher_p50_ms"] > 0


def test_a_black_box_mlp_over_a_window_gets_an_mlp_student_on_standardised_values(tmp_path) -> None:
    """A forecaster-like ONNX MLP taking (2, 24) windows of values near 100: no convolution in its graph,
    so the auto student is an MLP (a CNN timed against it shrank to nothing useful: MAE 27 against 0.8)
    trained on standardised inputs and targets, and it lands near the teacher."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                            nn.Linear(256, 3))
    x = 100 + 10 * torch.randn(600, 2, 24)
    with torch.no_grad():
        teacher[-1].bias.fill_(100.0)
        y = teacher(x)  # targets the teacher fits exactly, on its scale
    torch.onnx.export(teacher.eval(), (x[:2],), str(tmp_path / "teacher.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    spec = CompressSpec.model_validate({"task": "regression", "student": {"kind": "auto"},
                                        "quantization": {"method": "none"},
                                        "evaluation": {"latency_batch_sizes": [1, 32]}})
    res = compress(spec, teacher_path=tmp_path / "teacher.onnx", dataset_path=tmp_path / "data.npz",
                   output_dir=tmp_path / "out")
    assert res.metrics["student"]["config"]["architecture"] == "mlp"
    assert set(res.metrics["preprocessing"]["student"]) == {"inputs", "outputs"}  # both standardised, folded
    rows = {r["name"]: r["metric"] for r in res.metrics["models"]}
    assert rows["student"]["r2"] > 0.9, rows
