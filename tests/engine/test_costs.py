"""Costs estimated before anything runs: small uploads that describe huge tensors are refused from
their own headers (ONNX shape inference, config.json on the meta device, Parquet footers, image
headers, JSON Lines keys), with the estimate and the limit named; honest ones still load."""

from __future__ import annotations

import numpy as np
import pytest

from tests.malicious import costly
from worker.compression.errors import DatasetError, ShapeMismatchError, TooCostlyError
from worker.compression.io.onnx_cost import activation_cost
from worker.compression.io.validate import validate_dataset, validate_model
from worker.compression.spec import DataSpec

GiB = 1 << 30


@pytest.mark.parametrize("name", sorted(costly.ONNX_BOMBS))
def test_expanding_onnx_graph_refused_before_it_runs(name, tmp_path):
    path = costly.ONNX_BOMBS[name](tmp_path / f"{name}.onnx")
    with pytest.raises(TooCostlyError, match=r"needs about \d+\.\d GiB, past half of this task's memory limit of "
                                             r"3\.0 GiB") as err:  # fmt: skip
        validate_model(path, "onnx", memory_bytes=3 * GiB)
    assert err.value.code == "resource_limit"


def test_onnx_cost_tells_constants_from_per_sample_tensors(tmp_path):
    import onnx

    per_sample = activation_cost(onnx.load(costly.onnx_tile(tmp_path / "t.onnx", repeats=1_000)))
    assert per_sample.per_sample == 2 * 16 * 1_000 * 4 and per_sample.fixed == 0
    constant = activation_cost(onnx.load(costly.onnx_constant_of_shape(tmp_path / "c.onnx", rows=1_000)))
    assert constant.fixed == 2 * 1_000 * 16 * 4 and constant.per_sample < 1_000


def test_honest_onnx_teacher_loads_with_its_cost(tmp_path):
    summary = validate_model(costly.onnx_fine(tmp_path / "fine.onnx"), "onnx", memory_bytes=3 * GiB)
    assert summary["output_dim"] == 3
    assert summary["activation_bytes"] == {"fixed": 0, "per_sample": 2 * 32 * 4}


@pytest.mark.parametrize("name", sorted(costly.HF_BLOWUPS))
def test_hf_config_describing_a_giant_refused_before_building(name, tmp_path):
    path = costly.hf_zip(tmp_path / f"{name}.zip", **costly.HF_BLOWUPS[name])
    with pytest.raises(ShapeMismatchError, match=r"config.json describes a model of [\d,]+ parameters but "
                                                 r"model.safetensors holds 3,746 values"):  # fmt: skip
        validate_model(path, "hf_zip")


def test_hf_config_matching_its_weights_loads(tmp_path):
    summary = validate_model(costly.hf_zip(tmp_path / "ok.zip"), "hf_zip")
    assert summary["num_parameters"] >= 3_746 and summary["output_dim"] == 2


def test_parquet_refused_from_its_footer(tmp_path):
    path = costly.parquet_rows(tmp_path / "rows.parquet", rows=2_000_000, row_groups=4)
    with pytest.raises(TooCostlyError, match=r"2,000,000 rows of 2 columns take about 92 MiB decoded"):
        validate_dataset(path, DataSpec(), memory_bytes=64 << 20)
    assert validate_dataset(path, DataSpec(), memory_bytes=GiB)["samples"] == 2_000_000


def test_images_refused_from_their_headers(tmp_path):
    path = costly.png_zip(tmp_path / "big.zip", images=4, side=1_000)
    with pytest.raises(TooCostlyError, match=r"4 images of 3x1000x1000 take about 46 MiB decoded, past half "
                                             r"of this task's memory limit of 16 MiB"):  # fmt: skip
        validate_dataset(path, DataSpec(), memory_bytes=16 << 20)
    assert validate_dataset(path, DataSpec(), memory_bytes=GiB)["samples"] == 4


def test_jsonl_with_endless_distinct_keys_refused(tmp_path):
    path = costly.jsonl_keys(tmp_path / "keys.jsonl", lines=50, keys_per_line=300)
    with pytest.raises(DatasetError, match=r"row 34: the records hold more than 10,000 distinct keys"):
        validate_dataset(path, DataSpec())


def test_npz_past_half_the_memory_limit_refused(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.zeros((1_000, 1_000), np.float32), y=np.zeros(1_000, np.int64))
    with pytest.raises(TooCostlyError, match="the arrays in a.npz take about"):
        validate_dataset(path, DataSpec(), memory_bytes=4 << 20)
    assert validate_dataset(path, DataSpec(), memory_bytes=64 << 20)["samples"] == 1_000


@pytest.mark.parametrize("cfg", [
    {"architecture": "mlp", "input_dim": 12, "hidden": [32, 16], "output_dim": 3},
    {"architecture": "cnn", "in_channels": 3, "input_size": [16, 16], "channels": [8, 16], "output_dim": 5},
    {"architecture": "cnn1d", "in_channels": 2, "input_length": 40, "channels": [8, 8], "output_dim": 4},
    {"architecture": "resnet", "in_channels": 3, "input_size": [16, 16], "widths": [8, 16], "output_dim": 10},
    {"architecture": "transformer", "vocab_size": 100, "dim": 32, "num_layers": 2, "output_dim": 2},
])  # fmt: skip
def test_zoo_parameter_count_without_building_matches_the_model(cfg):
    """The API sizes a zoo student from its config alone (torch-free): the count must be the model's."""
    from worker.compression.spec.sizes import zoo_parameters
    from worker.compression.students import zoo

    built = zoo.count_parameters(zoo.build(zoo.validate_config({**cfg, "task": "classification"})))
    assert zoo_parameters(cfg) == built
