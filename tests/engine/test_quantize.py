"""Post-training quantization with onnxruntime.

Tolerances stated here: on a random 256-wide MLP every int8 method keeps the fp32 argmax on
≥ 95 % of inputs with a mean relative output error ≤ 5 % (int4, block 32: ≥ 80 % and ≤ 20 %).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from worker.compression.errors import Cancelled, InputError, ModelFileError, SpecError
from worker.compression.measure.export import export_onnx, run_onnx_model
from worker.compression.quantize.api import quantize
from worker.compression.quantize.calibration import calibration_sample
from worker.compression.spec import (
    AutoQuantizationConfig,
    DynamicInt8Config,
    Int4Config,
    NoQuantizationConfig,
    QatConfig,
    QuantizationSpec,
    StaticInt8Config,
    WeightOnlyInt8Config,
)
from worker.compression.students import zoo

MLP = {"architecture": "mlp", "input_dim": 64, "hidden": [256, 256], "output_dim": 10}
TRANSFORMER = {"architecture": "transformer", "vocab_size": 300, "dim": 128, "num_layers": 2, "num_heads": 4,
               "ffn_dim": 512, "max_len": 16, "output_dim": 6}


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_onnx(zoo.build(MLP), {"x": torch.randn(2, 64)}, tmp_path_factory.mktemp("m") / "mlp.onnx")


def _agreement_and_error(fp32: Path, quant: Path, inputs: dict[str, np.ndarray]) -> tuple[float, float]:
    ref, out = run_onnx_model(fp32, inputs), run_onnx_model(quant, inputs)
    agreement = float((ref.argmax(1) == out.argmax(1)).mean())
    return agreement, float(np.abs(out - ref).mean() / np.abs(ref).mean())


@pytest.mark.parametrize(
    ("method", "min_agreement", "max_error"),
    [("dynamic_int8", 0.95, 0.05), ("static_int8", 0.95, 0.05), ("weight_only_int8", 0.95, 0.05),
     ("int4", 0.8, 0.20)],
)
def test_each_method_runs_is_smaller_and_close(tmp_path: Path, mlp: Path, data, method: str,
                                               min_agreement: float, max_error: float) -> None:
    result = quantize(mlp, tmp_path / "q.onnx", TypeAdapter(QuantizationSpec).validate_python({"method": method}), calibration_inputs=data)
    agreement, error = _agreement_and_error(mlp, result.path, data)
    assert agreement >= min_agreement
    assert error <= max_error
    assert result.size_ratio < (0.2 if method == "int4" else 0.35)
    assert result.quant_size == result.path.stat().st_size
    assert result.method == method and result.options  # the exact onnxruntime options are recorded
    assert result.met is None and result.metric_fp32 is None  # no evaluation asked for
    if method != "static_int8":
        assert result.calibration == {"method": None, "samples": 0, "sample_ids": []}
    json.dumps(result.to_dict())


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
def test_calibration_methods(tmp_path: Path, mlp: Path, data, calibration: str) -> None:
    spec = StaticInt8Config(calibration=calibration, calibration_samples=64)
    result = quantize(mlp, tmp_path / "q.onnx", spec, calibration_inputs=data, seed=3)
    agreement, error = _agreement_and_error(mlp, result.path, data)
    assert agreement >= 0.95 and error <= 0.05
    assert result.options["calibrate_method"] == {"minmax": "MinMax", "percentile": "Percentile",
                                                  "entropy": "Entropy"}[calibration]
    assert result.calibration["method"] == calibration
    assert result.calibration["samples"] == 64
    assert result.calibration["sample_ids"] == calibration_sample(data, 64, 3)[1]


def test_calibration_sample_is_seeded() -> None:
    inputs = {"a": np.arange(50), "b": torch.arange(50) * 2}
    sample, ids = calibration_sample(inputs, 10, seed=1)
    assert ids == calibration_sample(inputs, 10, seed=1)[1] != calibration_sample(inputs, 10, seed=2)[1]
    assert len(set(ids)) == 10
    np.testing.assert_array_equal(sample["a"], np.asarray(ids))
    np.testing.assert_array_equal(sample["b"], 2 * np.asarray(ids))
    assert calibration_sample(inputs, 500, seed=0)[1] == list(range(50))
    with pytest.raises(InputError, match="row counts"):
        calibration_sample({"a": np.zeros(3), "b": np.zeros(4)}, 2, 0)


def test_int4_transformer_is_smaller_than_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.build(TRANSFORMER)
    ids = torch.randint(0, 300, (40, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fp32 = export_onnx(model, {k: v[:2] for k, v in inputs.items()}, tmp_path / "t.onnx")
    root = logging.getLogger()
    logging_before = (list(root.handlers), root.level)
    int8 = quantize(fp32, tmp_path / "t8.onnx", WeightOnlyInt8Config())
    int4 = quantize(fp32, tmp_path / "t4.onnx", Int4Config(block_size=32))
    assert (list(root.handlers), root.level) == logging_before  # onnxruntime's basicConfig undone
    assert int4.quant_size < 0.7 * int8.quant_size
    assert int8.size_ratio < 0.32
    ops = {n.op_type for n in onnx.load(str(int4.path)).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops  # the embedding table is int4 too
    arrays = {k: v.numpy() for k, v in inputs.items()}
    for result, max_error in ((int8, 0.05), (int4, 0.25)):
        assert _agreement_and_error(fp32, result.path, arrays)[1] <= max_error


def test_static_cnn_is_int8_with_float_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.build({"architecture": "cnn", "in_channels": 3, "input_size": [8, 8], "channels": [32, 64],
                       "hidden": 64, "output_dim": 5})
    fp32 = export_onnx(model, {"x": torch.randn(2, 3, 8, 8)}, tmp_path / "cnn.onnx")
    x = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = quantize(fp32, tmp_path / "q.onnx", StaticInt8Config(), calibration_inputs=x)
    graph = onnx.load(str(result.path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    assert producer["output"] == "Gemm"  # no QuantizeLinear/DequantizeLinear on the logits
    used = {i for n in graph.node for i in n.input}
    assert all(t.name in used for t in graph.initializer)  # nor their scales left behind
    weights = [producer.get(n.input[1]) for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert weights == ["DequantizeLinear"] * 4  # every conv and linear layer reads int8 weights
    assert result.size_ratio < 0.4  # a 27k-parameter net: int32 biases and scales weigh in
    agreement, error = _agreement_and_error(fp32, result.path, x)
    assert agreement >= 0.95 and error <= 0.05


class _Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 128, batch_first=True)
        self.head = torch.nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_dynamic_int8_quantizes_recurrent_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fp32 = export_onnx(_Recurrent(), {"x": torch.randn(2, 10, 16)}, tmp_path / "lstm.onnx")
    result = quantize(fp32, tmp_path / "q.onnx", DynamicInt8Config())
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert result.size_ratio < 0.35
    x = {"x": np.random.default_rng(0).standard_normal((50, 10, 16)).astype(np.float32)}
    assert _agreement_and_error(fp32, result.path, x)[1] <= 0.05


def test_none_copies(tmp_path: Path, mlp: Path) -> None:
    result = quantize(mlp, tmp_path / "copy.onnx", NoQuantizationConfig(), evaluate=lambda p: 0.5)
    assert result.path.read_bytes() == mlp.read_bytes()
    assert result.size_ratio == 1.0 and result.drop == 0.0


# --- accuracy-aware mode -------------------------------------------------------------------

@pytest.fixture(scope="module")
def outlier_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP whose first hidden layer has one unit firing at ~1e4 that the next layer ignores
    (zero weights): harmless in float, but it stretches the per-tensor int8 range of the second
    layer's input so much that every other activation rounds to zero."""
    torch.manual_seed(0)
    model = zoo.build({**MLP, "hidden": [128, 128]})
    with torch.no_grad():
        model.layers[0].bias[7] = 1e4
        model.layers[1].weight[:, 7] = 0.0
    return export_onnx(model, {"x": torch.randn(2, 64)}, tmp_path_factory.mktemp("o") / "outlier.onnx")


def _agreement_metric(reference: Path, inputs: dict[str, np.ndarray]):
    expected = run_onnx_model(reference, inputs).argmax(1)
    return lambda path: float((run_onnx_model(path, inputs).argmax(1) == expected).mean())


def test_accuracy_aware_keeps_the_outlier_layer_in_float(tmp_path: Path, outlier_mlp: Path, data) -> None:
    evaluate = _agreement_metric(outlier_mlp, data)
    spec = StaticInt8Config(calibration="minmax", max_metric_drop=0.03)
    stages = []
    result = quantize(outlier_mlp, tmp_path / "q.onnx", spec, calibration_inputs=data, evaluate=evaluate,
                      progress=lambda p: stages.append(p.stage))
    assert result.met is True
    assert "/layers.1/Gemm" in result.fp32_nodes and "/head/Gemm" not in result.fp32_nodes
    assert result.metric_fp32 == 1.0 and result.drop <= 0.03 and result.tolerance == 0.03
    assert evaluate(result.path) == result.metric_quant  # the written model is the one that met it
    costs = {r["node"]: r["cost"] for r in result.sensitivity}
    assert set(costs) == {"/layers.0/Gemm", "/layers.1/Gemm", "/head/Gemm"}
    # the outlier tensor is quantized as layers.0's output and as layers.1's input: both cost a lot
    assert costs["/layers.1/Gemm"] > 0.3 and costs["/layers.0/Gemm"] > 0.3 and costs["/head/Gemm"] < 0.1
    with result.sensitivity_path.open() as f:
        assert {r["node"]: float(r["cost"]) for r in csv.DictReader(f)} == pytest.approx(costs)
    assert "sensitivity" in stages and "fallback" in stages
    fully = quantize(outlier_mlp, tmp_path / "full.onnx",
                     StaticInt8Config(calibration="minmax"), calibration_inputs=data)
    assert evaluate(fully.path) < 0.5  # the model really needed it


def test_impossible_tolerance_reports_every_node(tmp_path: Path, mlp: Path, data) -> None:
    """An evaluation under which any quantized graph scores 0: no fallback can meet a zero drop."""
    def evaluate(path: Path) -> float:
        return 1.0 if path == mlp else 0.0

    spec = DynamicInt8Config(max_metric_drop=0.0)
    result = quantize(mlp, tmp_path / "q.onnx", spec, evaluate=evaluate)
    assert result.met is False
    assert result.fp32_nodes == []
    assert [r["node"] for r in result.sensitivity] != []
    assert {r["op_type"] for r in result.sensitivity} == {"MatMul"}
    assert all(r["cost"] == 1.0 and r["metric_when_quantized"] == 0.0 for r in result.sensitivity)
    assert "cannot meet" in result.message
    assert all(r["node"] in result.message for r in result.sensitivity)
    assert result.sensitivity_path.is_file()
    assert run_onnx_model(result.path, data).shape == (200, 10)


def test_relative_tolerance_and_lower_is_better(tmp_path: Path, mlp: Path, data) -> None:
    scores = iter([2.0, 2.1])  # fp32, then quantized: an error metric that got 5 % worse
    spec = DynamicInt8Config(max_metric_drop=0.1, drop_mode="relative")
    result = quantize(mlp, tmp_path / "q.onnx", spec, evaluate=lambda p: next(scores), higher_is_better=False)
    assert result.tolerance == pytest.approx(0.2)
    assert result.drop == pytest.approx(0.1)
    assert result.met is True and result.sensitivity == []


# --- bad input -------------------------------------------------------------------------------

def test_rejections(tmp_path: Path, mlp: Path, data) -> None:
    with pytest.raises(SpecError, match="qat"):
        quantize(mlp, tmp_path / "q.onnx", QatConfig())
    with pytest.raises(ValidationError, match="backend"):  # only onnxruntime exists: the spec says so
        DynamicInt8Config(backend="torch")
    with pytest.raises(InputError, match="calibration data"):
        quantize(mlp, tmp_path / "q.onnx", StaticInt8Config())
    with pytest.raises(SpecError, match="max_metric_drop"):
        quantize(mlp, tmp_path / "q.onnx", DynamicInt8Config(max_metric_drop=0.1))
    with pytest.raises(InputError, match="lacks model inputs"):
        quantize(mlp, tmp_path / "q.onnx", StaticInt8Config(),
                 calibration_inputs={"y": data["x"], "z": data["x"]})
    with pytest.raises(ModelFileError, match="does not exist"):
        quantize(tmp_path / "missing.onnx", tmp_path / "q.onnx", DynamicInt8Config())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        quantize(garbage, tmp_path / "q.onnx", DynamicInt8Config())


def test_cancel_during_calibration(tmp_path: Path, mlp: Path, data) -> None:
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2  # let preparation pass, stop inside calibration

    with pytest.raises(Cancelled):
        quantize(mlp, tmp_path / "q.onnx", StaticInt8Config(), calibration_inputs=data,
                 cancel=cancel)
    assert not (tmp_path / "q.onnx").exists()
    assert list(tmp_path.iterdir()) == []  # the work folder is gone too



def test_auto_method_is_dynamic_for_token_graphs_and_static_otherwise(tmp_path):
    from worker.compression.quantize.handlers import resolve_method

    mlp = zoo.build({"architecture": "mlp", "input_dim": 8, "hidden": [8], "output_dim": 2})
    vec = export_onnx(mlp, {"x": torch.randn(2, 8)}, tmp_path / "v.onnx")
    tr = zoo.build({"architecture": "transformer", "vocab_size": 20, "dim": 8, "num_layers": 1, "num_heads": 2,
                    "output_dim": 2})
    tok = export_onnx(tr, {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5,
                                                                                                  dtype=torch.long)},
                      tmp_path / "t.onnx")
    assert resolve_method(AutoQuantizationConfig(), vec).method == "static_int8"
    assert resolve_method(AutoQuantizationConfig(), tok).method == "dynamic_int8"
    assert resolve_method(Int4Config(), tok).method == "int4"
    cnn = zoo.build({"architecture": "cnn", "in_channels": 1, "input_size": [8, 8], "channels": [4], "output_dim": 2})
    img = export_onnx(cnn, {"x": torch.randn(2, 1, 8, 8)}, tmp_path / "c.onnx")
    assert resolve_method(AutoQuantizationConfig(), img).method == "static_int8"


def test_auto_method_is_dynamic_for_a_vision_transformer(tmp_path):
    """Float image input, but attention inside: a transformer, quantized as one."""
    from transformers import ViTConfig, ViTForImageClassification

    from worker.compression.quantize.handlers import resolve_method
    from worker.compression.students.hf_vision import HFVisionEncoder

    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, num_labels=2, attn_implementation="eager")
    vit = HFVisionEncoder(ViTForImageClassification(config), "classification").eval()
    path = export_onnx(vit, {"x": torch.randn(2, 3, 8, 8)}, tmp_path / "vit.onnx")
    assert resolve_method(AutoQuantizationConfig(max_metric_drop=0.02), path).method == "dynamic_int8"
    assert resolve_method(AutoQuantizationConfig(max_metric_drop=0.02), path).max_metric_drop == 0.02
