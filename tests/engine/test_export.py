"""ONNX export: graphs pass onnx.checker and onnxruntime matches PyTorch within atol 1e-4 + rtol 1e-3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from worker.compression.errors import CompressionError, InputError
from worker.compression.measure.export import check_onnx, export_onnx, onnx_size_bytes, run_onnx_model
from worker.compression.students import zoo

MLP = {"architecture": "mlp", "input_dim": 12, "hidden": [32, 32], "output_dim": 4}
CNN = {"architecture": "cnn", "in_channels": 1, "input_size": [8, 8], "channels": [8, 16], "hidden": 16,
       "output_dim": 3}
TRANSFORMER = {"architecture": "transformer", "vocab_size": 50, "dim": 16, "num_layers": 2, "num_heads": 2,
               "ffn_dim": 32, "max_len": 24, "output_dim": 5}


def _tokens(n: int, t: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t // 2 :] = 0  # one padded row
    return {"input_ids": torch.randint(0, 50, (n, t)), "attention_mask": mask}


@pytest.mark.parametrize(
    ("cfg", "make_inputs"),
    [(MLP, lambda n: {"x": torch.randn(n, 12)}), (CNN, lambda n: {"x": torch.randn(n, 1, 8, 8)}),
     (TRANSFORMER, lambda n: _tokens(n, 10))],
    ids=["mlp", "cnn", "transformer"],
)
def test_export_matches_torch_at_other_batch_sizes(tmp_path: Path, cfg, make_inputs) -> None:
    model = zoo.build(cfg)
    path = export_onnx(model, make_inputs(2), tmp_path / "m.onnx")
    result = check_onnx(path, model, make_inputs(7))
    assert result["ok"] is True
    assert result["max_abs_diff"] < 1e-4
    assert result["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}


def test_transformer_sequence_axis_is_dynamic(tmp_path: Path) -> None:
    model = zoo.build(TRANSFORMER).eval()
    path = export_onnx(model, _tokens(2, 6), tmp_path / "t.onnx")
    longer = _tokens(3, 17)
    with torch.no_grad():
        expected = model(**longer).numpy()
    np.testing.assert_allclose(run_onnx_model(path, longer), expected, atol=1e-4, rtol=1e-3)
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert names == ["input_ids", "attention_mask"]


class _TinyBert(nn.Module):
    """A transformers BERT (eager attention) with mean pooling, built offline from a config."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)
        cfg._attn_implementation = "eager"
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.task = "embedding"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def test_hf_bert_exports_with_task_metadata(tmp_path: Path) -> None:
    model = _TinyBert()
    inputs = {**_tokens(2, 8), "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    path = export_onnx(model, inputs, tmp_path / "bert.onnx")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props} == {"kdq_task": "embedding"}
    more = {**_tokens(5, 12), "token_type_ids": torch.zeros(5, 12, dtype=torch.long)}
    assert check_onnx(path, model, more)["ok"]
    assert model.training  # export put it in eval mode and restored the caller's mode


def test_task_argument_is_written(tmp_path: Path) -> None:
    path = export_onnx(zoo.build(MLP), {"x": torch.randn(2, 12)}, tmp_path / "m.onnx", task="regression")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props} == {"kdq_task": "regression"}


def test_check_onnx_rejects_a_graph_that_differs(tmp_path: Path) -> None:
    model = zoo.build(MLP)
    path = export_onnx(model, {"x": torch.randn(2, 12)}, tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.bias += 0.5
    with pytest.raises(CompressionError, match="differs from PyTorch"):
        check_onnx(path, model, {"x": torch.randn(4, 12)})


def test_size_counts_external_data(tmp_path: Path) -> None:
    model = zoo.build({**MLP, "hidden": [256]})
    path = export_onnx(model, {"x": torch.randn(2, 12)}, tmp_path / "m.onnx")
    single = onnx_size_bytes(path)
    assert single == path.stat().st_size
    proto = onnx.load(str(path))
    split = tmp_path / "split.onnx"
    onnx.save_model(proto, str(split), save_as_external_data=True, location="split.data", size_threshold=0)
    assert (tmp_path / "split.data").stat().st_size > 10_000
    assert onnx_size_bytes(split) == split.stat().st_size + (tmp_path / "split.data").stat().st_size
    assert onnx_size_bytes(split) > 0.95 * single


def test_run_onnx_model_batches_and_checks_inputs(tmp_path: Path) -> None:
    model = zoo.build(MLP).eval()
    path = export_onnx(model, {"x": torch.randn(2, 12)}, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((10, 12))  # float64: cast to the graph's float32
    whole = run_onnx_model(path, {"x": x, "unused": x})
    np.testing.assert_allclose(run_onnx_model(path, {"x": x}, batch_size=3), whole, rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(whole, model(x=torch.from_numpy(x).float()).numpy(), atol=1e-5)
    np.testing.assert_allclose(run_onnx_model(path, {"image": x}), whole, rtol=1e-6)  # one input: any name
    with pytest.raises(InputError, match="'x'"):
        run_onnx_model(path, {"y": x, "z": x})
