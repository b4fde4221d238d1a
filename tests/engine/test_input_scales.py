"""int8 of a model on raw features of very different scales keeps the layer that reads them in float."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from worker.compression.measure.export import export_onnx
from worker.compression.quantize.api import quantize
from worker.compression.quantize.input_scales import SPREAD, magnitude_span
from worker.compression.spec import DynamicInt8Config, StaticInt8Config
from worker.compression.students import zoo


def test_the_span_separates_raw_tables_from_pixels_and_standardised_ones() -> None:
    cancer = load_breast_cancer().data.astype(np.float32)
    digits = load_digits().data.astype(np.float32)  # 0..16, many pixels almost always 0
    assert magnitude_span(cancer) > 1000 * SPREAD
    assert magnitude_span(digits) < SPREAD
    assert magnitude_span((cancer - cancer.mean(0)) / cancer.std(0)) < 10
    assert magnitude_span(np.arange(12, dtype=np.int64).reshape(4, 3)) == 1.0  # ids: no scale to speak of


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory):
    """An MLP trained on standardised breast-cancer features with the standardisation folded into its
    first layer, as a delivered student is: it takes the raw features (0.001 to 4,000)."""
    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    torch.manual_seed(0)
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 30, "hidden": [32], "output_dim": 2}
    model = zoo.build(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xs, yt = torch.tensor((x - mean) / std), torch.tensor(y)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(xs), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = model.layers[0]
        first.bias.sub_(first.weight @ torch.tensor(mean / std))
        first.weight.div_(torch.tensor(std)[None, :])
    path = export_onnx(model.eval(), {"x": torch.tensor(x[:8])}, tmp_path_factory.mktemp("raw") / "m.onnx",
                       task="classification")
    return path, x


def _answers(path, x) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)


@pytest.mark.parametrize("config", [DynamicInt8Config(), StaticInt8Config(calibration_samples=128)],
                         ids=["dynamic", "static"])
def test_int8_on_raw_features_answers_as_fp32(raw_model, config, tmp_path) -> None:
    path, x = raw_model
    fp32 = _answers(path, x)
    result = quantize(path, tmp_path / "q.onnx", config, calibration_inputs={"x": x[:256]})
    assert (_answers(tmp_path / "q.onnx", x) == fp32).mean() >= 0.97
    assert len(result.fp32_nodes) == 1 and "kept in float" in result.message and "span 1:" in result.message
    blind = quantize(path, tmp_path / "blind.onnx", DynamicInt8Config())  # no sample: the old behaviour
    assert blind.fp32_nodes == [] and (_answers(tmp_path / "blind.onnx", x) == fp32).mean() < 0.9
