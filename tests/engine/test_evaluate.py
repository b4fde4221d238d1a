"""Runtime measurement, the side-by-side table, disagreements and per-class metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from worker.compression.errors import DatasetError, InputError, SpecError
from worker.compression.measure.evaluate import (
    ModelRow,
    _tile,
    compare_models,
    disagreements,
    measure_onnx_latency,
    measure_torch_latency,
    onnx_outputs,
    per_class_table,
)
from worker.compression.measure.export import export_onnx
from worker.compression.students import zoo

MLP = {"architecture": "mlp", "task": "classification", "input_dim": 6, "hidden": [16], "output_dim": 3}


@pytest.fixture
def mlp_onnx(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = zoo.build(MLP).eval()
    return model, export_onnx(model, {"x": torch.randn(2, 6)}, tmp_path / "mlp.onnx")


def _check_batches(lat: dict, sizes: list[int]) -> None:
    assert [b["batch"] for b in lat["batches"]] == sizes
    for b in lat["batches"]:
        assert 0 < b["p50_ms"] <= b["p95_ms"]
        assert b["mean_ms"] > 0
        assert b["throughput_per_s"] == pytest.approx(b["batch"] * 1000.0 / b["mean_ms"])


def test_onnx_latency_shape_and_session_threads(mlp_onnx) -> None:
    _, path = mlp_onnx
    sample = {"x": np.random.default_rng(0).normal(size=(3, 6))}  # float64: cast to the graph's float32
    lat = measure_onnx_latency(path, sample, batch_sizes=[1, 8], threads=2, warmup=2, repeats=12)
    assert lat["runtime"] == "onnxruntime" and lat["provider"] == "CPUExecutionProvider"
    assert lat["ort_version"] == ort.__version__
    # read back from the session's options, not echoed
    assert (lat["threads"], lat["inter_op_threads"], lat["sequential"]) == (2, 1, True)
    assert (lat["warmup"], lat["repeats"]) == (2, 12)
    _check_batches(lat, [1, 8])
    assert measure_onnx_latency(path, sample, batch_sizes=[2], threads=1, warmup=0, repeats=3)["threads"] == 1


def test_latency_rejects_bad_arguments(mlp_onnx) -> None:
    model, path = mlp_onnx
    for sizes in ([], [0], [4, -1]):
        with pytest.raises(SpecError, match="batch sizes"):
            measure_onnx_latency(
                path, {"x": np.zeros((1, 6))}, batch_sizes=sizes, threads=1, warmup=0, repeats=1
            )
    with pytest.raises(InputError, match="x"):  # (one array of another name is the one input; two are not)
        measure_onnx_latency(path, {"y": np.zeros((1, 6)), "z": np.zeros((1, 6))}, batch_sizes=[1], threads=1,
                             warmup=0, repeats=1)  # fmt: skip
    with pytest.raises(SpecError, match="threads"):
        measure_torch_latency(
            model, {"x": torch.zeros(1, 6)}, batch_sizes=[1], threads=0, warmup=0, repeats=1
        )


def test_tile_repeats_the_sample_rows() -> None:
    assert _tile(np.arange(3), 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert _tile(torch.arange(5), 2).tolist() == [0, 1]


def test_torch_latency_restores_threads_and_mode() -> None:
    model = zoo.build(MLP).train()
    torch.set_num_threads(1)
    lat = measure_torch_latency(
        model, {"x": torch.randn(2, 6)}, batch_sizes=[1, 4], threads=2, warmup=1, repeats=5
    )
    assert torch.get_num_threads() == 1 and model.training
    assert (lat["runtime"], lat["threads"], lat["device"]) == ("pytorch", 2, "cpu")
    assert lat["torch_version"] == torch.__version__
    _check_batches(lat, [1, 4])


def test_onnx_outputs_runs_the_whole_set_in_batches(mlp_onnx) -> None:
    model, path = mlp_onnx
    x = torch.randn(10, 6)
    out = onnx_outputs(path, {"x": x}, batch_size=3)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-5)


def _lat(p50_by_batch: dict[int, float]) -> dict:
    return {
        "runtime": "onnxruntime",
        "batches": [
            {"batch": b, "p50_ms": v, "p95_ms": v * 1.2, "mean_ms": v, "throughput_per_s": b * 1000 / v}
            for b, v in p50_by_batch.items()
        ],
    }


def test_compare_models_flags_a_bigger_slower_int8_row() -> None:
    table = compare_models(
        [
            ModelRow("teacher", {"accuracy": 0.95}, 1000, 400, _lat({1: 10.0, 64: 100.0})),
            ModelRow(
                "student", {"accuracy": 0.93}, 250, 100, _lat({1: 4.0, 64: 25.0}), "teacher", "onnx fp32"
            ),
            ModelRow("int8", {"accuracy": 0.92}, 300, 100, _lat({1: 2.0, 64: 40.0}), "student", "onnx int8"),
        ]
    )
    teacher, student, int8 = table
    assert teacher["vs_replaced"] is None and teacher["vs_teacher"] is None and teacher["flags"] == []
    assert student["flags"] == []
    assert student["vs_replaced"]["size_ratio"] == pytest.approx(0.25)
    assert student["vs_replaced"]["speedup"] == pytest.approx({"1": 2.5, "64": 4.0})
    assert student["vs_teacher"]["metric_delta"]["accuracy"] == pytest.approx(-0.02)

    assert int8["vs_replaced"]["name"] == "student"
    assert int8["vs_replaced"]["size_ratio"] == pytest.approx(1.2)
    assert int8["vs_replaced"]["speedup"] == pytest.approx({"1": 2.0, "64": 0.625})
    assert int8["vs_teacher"]["speedup"] == pytest.approx({"1": 5.0, "64": 2.5})
    assert [(f["flag"], f["batch"]) for f in int8["flags"]] == [("not_smaller", None), ("not_faster", 64)]
    assert "300 B vs 250 B" in int8["flags"][0]["message"]
    assert "40.000 ms vs 25.000 ms" in int8["flags"][1]["message"]
    assert (int8["format"], int8["runtime"]) == ("onnx int8", "onnxruntime")


def test_compare_models_rejects_an_unknown_replaced_row() -> None:
    with pytest.raises(ValueError, match="unknown row 'student'"):
        compare_models([ModelRow("int8", {}, 1, 1, _lat({1: 1.0}), "student")])


def test_disagreements_classification_finds_the_planted_examples() -> None:
    teacher = torch.zeros(6, 3)
    teacher[:, 0] = 4.0  # the teacher is sure of class 0 everywhere
    student = teacher.clone()
    student[4] = torch.tensor([0.0, 6.0, 0.0])  # planted: confidently class 1
    student[2] = torch.tensor([2.0, 1.5, 0.0])  # a milder disagreement
    rows = disagreements(
        "classification",
        student,
        teacher,
        2,
        texts=[f"t{i}" for i in range(6)],
        y=torch.zeros(6, dtype=torch.long),
        classes=["neg", "pos", "<mid>"],
    )
    assert [r["index"] for r in rows] == [4, 2]
    top = rows[0]
    assert (top["student_pred"], top["teacher_pred"], top["label"], top["text"]) == (
        "pos",
        "neg",
        "neg",
        "t4",
    )
    assert top["student_conf"] == pytest.approx(torch.softmax(student[4], 0)[1].item())
    assert top["teacher_conf"] == pytest.approx(torch.softmax(teacher[4], 0)[0].item())
    assert top["kl"] > rows[1]["kl"] > 0


def test_disagreements_embedding_and_regression() -> None:
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(5, 4))
    student = teacher + 0.01 * rng.normal(size=(5, 4))
    student[3] = -teacher[3]
    rows = disagreements("embedding", student, teacher, 1)
    assert rows[0]["index"] == 3 and rows[0]["cosine"] == pytest.approx(-1.0)

    t = np.arange(5.0)[:, None]
    s = t.copy()
    s[1] += 3.0
    s[4] -= 1.0
    rows = disagreements("regression", s, t, 5)
    assert [r["index"] for r in rows][:2] == [1, 4]
    assert rows[0]["abs_diff"] == pytest.approx(3.0) and rows[0]["student"] == [4.0]


def test_per_class_table_side_by_side() -> None:
    y = np.array([0, 0, 1, 1, 2])
    preds = {"teacher": torch.tensor([0, 0, 1, 1, 2]), "int8": torch.tensor([0, 1, 1, 1, 0])}
    rows = per_class_table(y, preds, ["a", "b", "<c>"])
    assert [(r["class"], r["support"]) for r in rows] == [("a", 2), ("b", 2), ("<c>", 1)]
    assert all(r["teacher_f1"] == 1.0 for r in rows)
    # int8: class a: tp 1, predicted 2, support 2; class b: tp 2, predicted 3; class c: tp 0
    assert rows[0]["int8_precision"] == pytest.approx(0.5) and rows[0]["int8_recall"] == pytest.approx(0.5)
    assert rows[1]["int8_precision"] == pytest.approx(2 / 3) and rows[1]["int8_recall"] == 1.0
    assert rows[1]["int8_f1"] == pytest.approx(0.8)
    assert rows[2]["int8_f1"] == 0.0
    single = per_class_table(y, y, ["a", "b", "c"])
    assert single[2] == {"class": "c", "index": 2, "support": 1, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    with pytest.raises(DatasetError, match="labels must be class indices"):
        per_class_table(np.array([0, 3]), np.array([0, 1]), ["a", "b"])
