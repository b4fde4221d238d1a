"""Safe teacher loaders: zoo folders, zips, ONNX graphs, and every way a file can be bad."""

from __future__ import annotations

import gc
import json
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from worker.compression.errors import (
    MissingTensorError,
    ModelFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    TruncatedFileError,
    UnexpectedTensorError,
    UnsafeFileError,
    UnsupportedFormatError,
    UnsupportedOpError,
)
from worker.compression.io import safetensors_io, teachers
from worker.compression.io.onnx_teacher import load_onnx_teacher
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.students import zoo

MLP = {"architecture": "mlp", "input_dim": 6, "hidden": [8], "output_dim": 3}
CNN = {"architecture": "cnn", "in_channels": 2, "input_size": [8, 8], "channels": [4, 6], "hidden": 8,
       "output_dim": 5}
TRANSFORMER = {"architecture": "transformer", "vocab_size": 30, "max_len": 16, "dim": 16, "num_layers": 1,
               "num_heads": 2, "ffn_dim": 32, "output_dim": 4}
SEQ = 12


def _trained(cfg: dict) -> nn.Module:
    """A zoo model whose BatchNorm statistics are not the defaults, so a round trip must carry them."""
    model = zoo.build(cfg)
    if cfg["architecture"] == "cnn":
        model.train()
        model(torch.randn(4, *zoo.input_shape(cfg)))
    return model.eval()


def _sample(cfg: dict, n: int = 3) -> dict[str, torch.Tensor]:
    if zoo.input_kind(cfg) == "tokens":
        ids = torch.randint(1, cfg["vocab_size"], (n, SEQ))
        mask = torch.ones_like(ids)
        mask[0, SEQ // 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"x": torch.randn(n, *zoo.input_shape(cfg))}


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str,
            dynamic_batch: bool = True) -> Path:
    axes = {n: {0: "batch"} for n in [*input_names, output_name]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=input_names, output_names=[output_name],
                          dynamic_axes=axes, dynamo=False)
    return path


@pytest.fixture
def zoo_folder(tmp_path: Path) -> Path:
    return save_zoo_model(_trained(MLP), MLP, tmp_path / "teacher")


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


# --- zoo folders and zips ---------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_zoo_round_trip_gives_identical_outputs(tmp_path: Path, cfg: dict) -> None:
    model = _trained(cfg)
    folder = save_zoo_model(model, cfg, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["format"] == "kdq-zoo"
    teacher = load_teacher(folder)
    x = _sample(cfg)
    assert torch.equal(teacher.predict(x), model(**x))
    assert (teacher.kind, teacher.task, teacher.output_dim) == ("zoo", "classification", cfg["output_dim"])
    assert teacher.input_kind == zoo.input_kind(cfg)
    assert teacher.input_shape == zoo.input_shape(cfg)
    assert teacher.num_parameters == zoo.count_parameters(model)
    assert teacher.size_bytes == _weights(folder).stat().st_size
    assert teacher.features(x) is not None


def test_task_argument_overrides_the_config(zoo_folder: Path) -> None:
    assert load_teacher(zoo_folder, task="regression").task == "regression"


@pytest.mark.parametrize("top", ["", "my-teacher/"], ids=["flat", "single-top-folder"])
def test_zip_of_zoo_folder_loads_and_cleans_up(tmp_path: Path, zoo_folder: Path, top: str) -> None:
    archive = tmp_path / "teacher.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in zoo_folder.iterdir():
            zf.write(f, top + f.name)
    teacher = load_teacher(archive)
    x = _sample(MLP)
    assert torch.equal(teacher.predict(x), load_teacher(zoo_folder).predict(x))
    extracted = teacher.source_dir
    assert extracted is not None and (extracted / "config.json").is_file()
    del teacher
    gc.collect()
    assert not extracted.exists()


def test_zoo_folder_without_weights_is_refused(zoo_folder: Path) -> None:
    _weights(zoo_folder).unlink()
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_teacher(zoo_folder)


def test_bad_zoo_config_is_a_model_error(zoo_folder: Path) -> None:
    (zoo_folder / "config.json").write_text(json.dumps({"architecture": "lstm", "output_dim": 2}))
    with pytest.raises(ModelFileError, match="unknown zoo architecture 'lstm'"):
        load_teacher(zoo_folder)


# --- safetensors checks -----------------------------------------------------------------

def test_truncated_safetensors(zoo_folder: Path) -> None:
    w = _weights(zoo_folder)
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(TruncatedFileError, match="truncated"):
        load_teacher(zoo_folder)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_lying_header_is_caught_before_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("tensors were loaded")

    monkeypatch.setattr(safetensors_io, "load_file", never)
    huge = {"dtype": "F32", "shape": [1_000_000_000], "data_offsets": [0, 4_000_000_000]}
    path = _raw_safetensors(tmp_path / "w.safetensors", {"w": huge}, b"\0" * 16)
    with pytest.raises(TruncatedFileError, match="'w' ends at byte 4000000000 of a 16-byte"):
        safetensors_io.load_state_dict(path)


@pytest.mark.parametrize(
    ("header", "data", "error", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, ModelFileError, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, ModelFileError, "needs 12 bytes"),
        ({"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, 8, ModelFileError, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, ModelFileError, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, ModelFileError, "invalid data_off"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, ModelFileError, "gap of 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, ModelFileError, "4 bytes after"),
        ({"__metadata__": {"k": 1}}, 0, ModelFileError, "__metadata__"),
    ],
    ids=["overlap", "element-count", "dtype", "negative-dim", "reversed-offsets", "gap", "trailing",
         "metadata"],
)
def test_header_checks(tmp_path: Path, header: dict, data: int, error: type, message: str) -> None:
    path = _raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * data)
    with pytest.raises(error, match=message):
        safetensors_io.read_header(path)


def test_header_length_and_tiny_files(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(TruncatedFileError, match="too short"):
        safetensors_io.read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(TruncatedFileError, match="header claims"):
        safetensors_io.read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    with pytest.raises(ModelFileError, match="not a JSON object"):
        safetensors_io.read_header(path)
    scalar = {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}
    _raw_safetensors(path, {"__metadata__": {"note": "ok"}, "a": scalar}, b"\0" * 8)
    assert safetensors_io.read_header(path)["a"].shape == ()


def _rewrite(folder: Path, edit) -> None:
    state = safetensors_io.load_state_dict(_weights(folder))
    edit(state)
    save_file(state, str(_weights(folder)))


def test_missing_tensor_is_named(zoo_folder: Path) -> None:
    _rewrite(zoo_folder, lambda s: s.pop("head.bias"))
    with pytest.raises(MissingTensorError, match="'head.bias'"):
        load_teacher(zoo_folder)


def test_unexpected_tensor_is_named(zoo_folder: Path) -> None:
    _rewrite(zoo_folder, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorError, match="'extra.weight'"):
        load_teacher(zoo_folder)


def test_shape_mismatch_names_tensor_and_shapes(zoo_folder: Path) -> None:
    _rewrite(zoo_folder, lambda s: s.update({"head.weight": torch.zeros(3, 7)}))
    with pytest.raises(ShapeMismatchError, match=r"'head.weight' has shape \[3, 7\], expected \[3, 8\]"):
        load_teacher(zoo_folder)


def test_huge_config_is_checked_against_the_file_before_building(zoo_folder: Path) -> None:
    cfg = json.loads((zoo_folder / "config.json").read_text())
    (zoo_folder / "config.json").write_text(json.dumps({**cfg, "hidden": [1 << 30]}))
    with pytest.raises(ShapeMismatchError, match="1073741824"):  # would be 24 GiB if built
        load_teacher(zoo_folder)


def test_nan_weight_is_named(zoo_folder: Path) -> None:
    def poison(state: dict) -> None:
        state["layers.0.weight"][1, 2] = float("nan")

    _rewrite(zoo_folder, poison)
    with pytest.raises(NonFiniteWeightsError, match="'layers.0.weight' has 1 NaN"):
        load_teacher(zoo_folder)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    src = _Tied()
    path = safetensors_io.save_module(src, tmp_path / "tied.safetensors")
    assert len(safetensors_io.read_header(path)) == 1
    dst = safetensors_io.load_into(_Tied(), path)
    assert torch.equal(dst.out.weight, src.emb.weight)
    assert dst.out.weight is dst.emb.weight


# --- code-bearing files -----------------------------------------------------------------

class _Canary:
    """Unpickling this creates the canary file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_pickle_files_are_refused_unopened(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = pickle.dumps(_Canary(canary))

    bare = tmp_path / "model.pt"
    bare.write_bytes(payload)
    no_suffix = tmp_path / "model"
    no_suffix.write_bytes(payload)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "model.pt").write_bytes(payload)
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (hf_like / "pytorch_model.bin").write_bytes(payload)
    torch_zip = tmp_path / "teacher.zip"
    torch.save(_Canary(canary), torch_zip)  # a torch.save archive: <top>/data.pkl
    script_zip = tmp_path / "script.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, still the format uploads arrive in
        torch.jit.script(nn.Linear(2, 2)).save(str(script_zip))  # TorchScript: <top>/constants.pkl, code/
    program_zip = tmp_path / "program.zip"
    with zipfile.ZipFile(program_zip, "w") as zf:  # the layout torch.export.save writes
        zf.writestr("program/archive_format", "pt2")
        zf.writestr("program/models/model.json", "{}")

    pickled = "this is a Python pickle.*never loaded"
    for path, message in [(bare, pickled), (no_suffix, pickled), (loose, pickled),
                          (hf_like, "pickle checkpoints are refused"), (torch_zip, r"pickle \(torch.save\)"),
                          (script_zip, "TorchScript.*code-bearing.*KDQ_ALLOW_CODE_CHECKPOINTS=1"),
                          (program_zip, "ExportedProgram.*code-bearing.*KDQ_ALLOW_CODE_CHECKPOINTS=1")]:
        with pytest.raises(UnsafeFileError, match=message):
            load_teacher(path)
    for path in (bare, no_suffix, loose, torch_zip):  # the operator's flag opens no door to pickles
        with pytest.raises(UnsafeFileError, match="pickle"):
            load_teacher(path, allow_code=True)
    assert not canary.exists()


def test_bare_safetensors_and_unknown_files(tmp_path: Path, zoo_folder: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="config.json"):
        load_teacher(_weights(zoo_folder))
    (zoo_folder / "config.json").unlink()
    with pytest.raises(UnsupportedFormatError, match="config.json"):
        load_teacher(zoo_folder)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match=r"\.onnx file"):
        load_teacher(other)


def test_hf_folders_are_delegated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(teachers, "load_hf_teacher",
                        lambda folder, task=None: calls.append((folder, task)) or "hf-teacher")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"")  # sharded: no model.safetensors
    (tmp_path / "training_args.bin").write_bytes(b"ignored")
    assert load_teacher(tmp_path, task="embedding") == "hf-teacher"
    assert calls == [(tmp_path, "embedding")]


# --- ONNX -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _trained(MLP)
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    return model, _export(model, (torch.randn(2, 6),), path, ["x"], "logits")


def test_onnx_mlp_matches_torch(mlp_onnx: tuple[nn.Module, Path]) -> None:
    model, path = mlp_onnx
    teacher = load_teacher(path)
    x = _sample(MLP, 5)
    torch.testing.assert_close(teacher.predict(x), model(**x), atol=1e-5, rtol=1e-5)
    assert (teacher.kind, teacher.task, teacher.input_kind, teacher.input_shape, teacher.output_dim) == (
        "onnx", "classification", "vector", (6,), 3)
    assert teacher.module is None and teacher.features(x) is None
    assert teacher.num_parameters == zoo.count_parameters(model)
    assert teacher.size_bytes == path.stat().st_size


def test_onnx_folder_and_task_from_metadata(tmp_path: Path, mlp_onnx: tuple[nn.Module, Path]) -> None:
    proto = onnx.load(str(mlp_onnx[1]))
    helper.set_model_props(proto, {"kdq_task": "regression"})
    onnx.save(proto, str(tmp_path / "graph.onnx"))
    assert load_teacher(tmp_path).task == "regression"
    assert load_teacher(tmp_path, task="embedding").task == "embedding"


def test_onnx_fixed_batch_runs_in_chunks(tmp_path: Path) -> None:
    model = _trained(MLP)
    path = _export(model, (torch.randn(2, 6),), tmp_path / "fixed.onnx", ["x"], "logits", dynamic_batch=False)
    x = _sample(MLP, 5)
    torch.testing.assert_close(load_teacher(path).predict(x), model(**x), atol=1e-5, rtol=1e-5)


def test_onnx_cnn_is_an_image_teacher(tmp_path: Path) -> None:
    model = _trained(CNN)
    path = _export(model, (torch.randn(2, 2, 8, 8),), tmp_path / "cnn.onnx", ["pixels"], "logits")
    teacher = load_onnx_teacher(path)
    assert (teacher.input_kind, teacher.input_shape, teacher.output_dim) == ("image", (2, 8, 8), 5)
    x = _sample(CNN)
    torch.testing.assert_close(teacher.predict(x), model(**x), atol=1e-5, rtol=1e-5)


def test_onnx_dynamic_sample_dims_are_refused(tmp_path: Path) -> None:
    model = _trained(CNN)
    path = tmp_path / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 2, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    with pytest.raises(ModelFileError, match="static per-sample dims"):
        load_onnx_teacher(path)


class _Hidden(nn.Module):
    """The zoo transformer's last hidden states (N, T, D), like a bare encoder export."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_features(input_ids, attention_mask).hidden[-1]


def test_onnx_token_teachers(tmp_path: Path) -> None:
    model = _trained(TRANSFORMER)
    x = _sample(TRANSFORMER)
    args = (x["input_ids"], x["attention_mask"])
    names = ["input_ids", "attention_mask"]

    logits = load_onnx_teacher(_export(model, args, tmp_path / "cls.onnx", names, "logits"))
    assert (logits.input_kind, logits.input_shape, logits.task, logits.output_dim) == (
        "tokens", (SEQ,), "classification", 4)
    torch.testing.assert_close(logits.predict(x), model(**x), atol=1e-5, rtol=1e-5)

    encoder_path = _export(_Hidden(model), args, tmp_path / "enc.onnx", names, "last_hidden_state")
    encoder = load_onnx_teacher(encoder_path)
    assert (encoder.task, encoder.output_dim, encoder.config["pooled"]) == ("embedding", 16, True)
    h = _Hidden(model)(**x)
    mask = x["attention_mask"][..., None].float()
    torch.testing.assert_close(encoder.predict(x), (h * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)


def test_truncated_onnx(tmp_path: Path, mlp_onnx: tuple[nn.Module, Path]) -> None:
    data = mlp_onnx[1].read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError, match="cut.onnx"):
        load_teacher(path)
    path.write_bytes(b"")
    with pytest.raises(TruncatedFileError, match="empty"):
        load_teacher(path)


def _tiny_graph(node: onnx.NodeProto, opsets: list, initializers: list | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([node], "g", [x], [y], initializer=initializers or [])
    return helper.make_model(graph, opset_imports=opsets)


def test_unknown_ops_are_named(tmp_path: Path) -> None:
    custom = _tiny_graph(helper.make_node("Frobnicate", ["x"], ["y"], domain="com.evil"),
                         [helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)])
    onnx.save(custom, str(tmp_path / "custom.onnx"))
    with pytest.raises(UnsupportedOpError, match="'Frobnicate'.*custom domain"):
        load_teacher(tmp_path / "custom.onnx")
    future = _tiny_graph(helper.make_node("Gelu", ["x"], ["y"]), [helper.make_opsetid("", 17)])
    onnx.save(future, str(tmp_path / "future.onnx"))
    with pytest.raises(UnsupportedOpError, match="'Gelu'.*opset 17"):
        load_teacher(tmp_path / "future.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 4])
    no_kernel = helper.make_model(helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(no_kernel, str(tmp_path / "erf.onnx"))  # valid ONNX, but onnxruntime has no double Erf
    with pytest.raises(UnsupportedOpError, match="no CPU kernel for op 'Erf'"):
        load_teacher(tmp_path / "erf.onnx")


def _add_bias_model(bias: np.ndarray) -> onnx.ModelProto:
    return _tiny_graph(helper.make_node("Add", ["x", "bias"], ["y"]), [helper.make_opsetid("", 17)],
                       [numpy_helper.from_array(bias.astype(np.float32), "bias")])


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    onnx.save_model(_add_bias_model(np.arange(4)), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    teacher = load_teacher(tmp_path / "m.onnx", task="regression")
    sizes = [(tmp_path / name).stat().st_size for name in ("m.onnx", "weights.bin")]
    assert teacher.size_bytes == sum(sizes)
    torch.testing.assert_close(teacher.predict({"x": torch.ones(2, 4)}), torch.arange(1.0, 5.0).expand(2, 4))


def test_external_data_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "upload"
    inner.mkdir()
    onnx.save_model(_add_bias_model(np.arange(4)), str(inner / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    shutil.move(inner / "weights.bin", tmp_path / "secret.bin")
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(proto, str(inner / "m.onnx"))
    with pytest.raises(UnsafeFileError, match=r"'\.\./secret\.bin' leaves the model folder"):
        load_teacher(inner / "m.onnx")


def test_truncated_external_data(tmp_path: Path) -> None:
    onnx.save_model(_add_bias_model(np.arange(4)), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 6)
    with pytest.raises(TruncatedFileError, match="'bias'.*needs 16"):
        load_teacher(tmp_path / "m.onnx")


def test_nan_initializer_is_named(tmp_path: Path) -> None:
    onnx.save(_add_bias_model(np.array([0.0, np.nan, np.inf, 1.0])), str(tmp_path / "nan.onnx"))
    with pytest.raises(NonFiniteWeightsError, match="'bias' has 1 NaN and 1 infinite"):
        load_teacher(tmp_path / "nan.onnx")
