"""Offline transformer fusion before dynamic int8, and ``auto`` measuring it against the unfused graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from worker.compression.measure.export import export_onnx
from worker.compression.quantize.api import quantize
from worker.compression.quantize_choice import formats_for
from worker.compression.search.recipes import recipes_for
from worker.compression.spec import AutoQuantizationConfig, DynamicInt8Config

LAYERS = 2


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=3,
                     attn_implementation="eager")
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 200, (8, 16))
    mask = torch.ones_like(ids)
    mask[:4, 10:] = 0  # padded rows: the fused Attention must take the mask
    path = export_onnx(Logits(model), {"input_ids": ids, "attention_mask": mask},
                       tmp_path_factory.mktemp("bert") / "bert.onnx", task="classification")
    return path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _run(path, feed) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_fused_dynamic_int8_has_the_fused_ops_and_the_same_answers(bert, tmp_path) -> None:
    path, feed = bert
    plain = quantize(path, tmp_path / "plain.onnx", DynamicInt8Config())
    fused = quantize(path, tmp_path / "fused.onnx", DynamicInt8Config(fuse_transformer=True))
    assert "fused_ops" not in plain.options
    assert fused.options["fused_ops"]["Attention"] == LAYERS
    assert fused.options["fused_ops"]["SkipLayerNormalization"] == 2 * LAYERS
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert {"QAttention", "SkipLayerNormalization"} <= ops  # the fused attention was quantized too
    ref, a, b = _run(path, feed), _run(tmp_path / "plain.onnx", feed), _run(tmp_path / "fused.onnx", feed)
    assert np.abs(b - ref).max() < 0.1 and np.abs(a - ref).max() < 0.1
    assert (b.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_auto_measures_transformers_fused_and_unfused(bert) -> None:
    path, _ = bert
    auto = AutoQuantizationConfig(max_metric_drop=0.02)
    formats = formats_for(auto, path, "tokens")
    assert set(formats) == {"dynamic_int8", "dynamic_int8_fused"}
    assert formats["dynamic_int8_fused"].fuse_transformer and not formats["dynamic_int8"].fuse_transformer
    assert formats["dynamic_int8_fused"].max_metric_drop == 0.02
    assert set(recipes_for(auto, "tokens")) == {"dynamic_int8", "dynamic_int8_fused"}
    assert "dynamic_int8_fused" not in recipes_for(auto, "vector")
    assert formats_for(DynamicInt8Config(), path, "tokens") == {}  # a named method is applied as named
