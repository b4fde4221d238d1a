"""Writers of small uploads that ask for a lot: graphs that expand, configs that describe giant
models, tables and archives that decode to gigabytes. Each returns the path it wrote (all are
well under a megabyte but a few, which stay under the test stack's 8 MB upload cap).

Used by the engine's cost tests, the service's hostile-cost test and `bench/abuse.py`."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

FEATURES = 16


def _graph(nodes: list, initializers: list, path: Path) -> Path:
    graph = h.make_graph(nodes, "costly", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=initializers)  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _head() -> tuple[list, list]:
    """(N, 16) → (N, 2): a MatMul after the expanding part brought the tensor back to (N, 16)."""
    return [h.make_node("MatMul", ["back", "w"], ["y"])], [nh.from_array(np.ones((FEATURES, 2), np.float32), "w")]


def _i64(name: str, values: list[int] | int) -> TensorProto:
    return nh.from_array(np.array(values, np.int64), name)


def onnx_tile(path: Path, repeats: int = 50_000_000) -> Path:
    """The reported one: ``x[N,16] → Tile(1, repeats) → ReduceMean`` — per sample 16 × repeats floats."""
    nodes, inits = _head()
    return _graph([h.make_node("Tile", ["x", "r"], ["t"]),
                   h.make_node("Reshape", ["t", "shape"], ["t3"]),
                   h.make_node("ReduceMean", ["t3"], ["back"], axes=[1], keepdims=0), *nodes],
                  [_i64("r", [1, repeats]), _i64("shape", [-1, repeats, FEATURES]), *inits], path)  # fmt: skip


def onnx_expand(path: Path, size: int = 50_000_000) -> Path:
    nodes, inits = _head()
    return _graph([h.make_node("Unsqueeze", ["x", "ax"], ["u"]),
                   h.make_node("Expand", ["u", "s"], ["t"]),
                   h.make_node("ReduceMean", ["t"], ["back"], axes=[1], keepdims=0), *nodes],
                  [_i64("ax", [1]), _i64("s", [1, size, FEATURES]), *inits], path)  # fmt: skip


def onnx_constant_of_shape(path: Path, rows: int = 50_000_000) -> Path:
    """A constant (no batch dim): onnxruntime would fold it when the session is built."""
    nodes, inits = _head()
    return _graph([h.make_node("ConstantOfShape", ["s"], ["c"], value=nh.from_array(np.ones(1, np.float32))),
                   h.make_node("ReduceMean", ["c"], ["m"], axes=[0], keepdims=0),
                   h.make_node("Add", ["x", "m"], ["back"]), *nodes],
                  [_i64("s", [rows, FEATURES]), *inits], path)  # fmt: skip


def onnx_range(path: Path, limit: int = 900_000_000) -> Path:
    nodes, inits = _head()
    return _graph([h.make_node("Range", ["a", "b", "c"], ["r"]),
                   h.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
                   h.make_node("ReduceMean", ["rf"], ["m"], keepdims=0),
                   h.make_node("Add", ["x", "m"], ["back"]), *nodes],
                  [_i64("a", 0), _i64("b", limit), _i64("c", 1), *inits], path)  # fmt: skip


def onnx_resize(path: Path, scale: float = 50_000_000.0) -> Path:
    nodes, inits = _head()
    return _graph([h.make_node("Unsqueeze", ["x", "ax"], ["u"]),
                   h.make_node("Resize", ["u", "", "sc"], ["t"], mode="nearest"),
                   h.make_node("ReduceMean", ["t"], ["back"], axes=[2], keepdims=0), *nodes],
                  [_i64("ax", [2]), nh.from_array(np.array([1, 1, scale], np.float32), "sc"), *inits], path)  # fmt: skip


def onnx_fine(path: Path) -> Path:
    """A small honest graph (the control): one hidden layer of 32."""
    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Relu", ["a"], ["r"]),
         h.make_node("MatMul", ["r", "w2"], ["y"])], "fine",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[nh.from_array(rng.normal(size=(FEATURES, 32)).astype(np.float32), "w1"),
                     nh.from_array(rng.normal(size=(32, 3)).astype(np.float32), "w2")])  # fmt: skip
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


ONNX_BOMBS: dict[str, Callable[[Path], Path]] = {
    "onnx_tile": onnx_tile, "onnx_expand": onnx_expand, "onnx_constant_of_shape": onnx_constant_of_shape,
    "onnx_range": onnx_range, "onnx_resize": onnx_resize,
}


# --- Hugging Face folders whose config.json describes a giant --------------------------------------

HF_SMALL = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32}  # fmt: skip
HF_BLOWUPS: dict[str, dict[str, int]] = {
    "hf_vocab": {"vocab_size": 40_000_000},
    "hf_intermediate": {"intermediate_size": 50_000_000},
    "hf_positions": {"max_position_embeddings": 40_000_000},
    "hf_layers": {"num_hidden_layers": 400, "hidden_size": 1024, "intermediate_size": 4096},
}


def hf_zip(path: Path, **overrides: int) -> Path:
    """A real tiny BERT classifier (weights, tokenizer) zipped, with ``overrides`` written into its
    config.json afterwards: the weights stay tiny, the config asks for the giant."""
    import tempfile

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *["the", "a", "cat", "dog", "sat", "good", "bad"]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        BertForSequenceClassification(BertConfig(**HF_SMALL, num_labels=2)).save_pretrained(folder)
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **overrides}))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, file.name)
    return path


# --- datasets --------------------------------------------------------------------------------------

def parquet_rows(path: Path, rows: int = 400_000_000, row_groups: int = 40) -> Path:
    """``rows`` zero rows (one feature, one label) in zstd row groups: a few MB on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_group = rows // row_groups
    zeros = pa.array(np.zeros(per_group, np.float32))
    table = pa.table({"f0": zeros, "label": pa.array(np.zeros(per_group, np.int8))})
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for _ in range(row_groups):
            writer.write_table(table, row_group_size=per_group)
    return path


def jsonl_keys(path: Path, lines: int = 1_000, keys_per_line: int = 1_000) -> Path:
    """Every line a text, a label and ``keys_per_line`` keys no other line has."""
    with open(path, "w") as f:
        for i in range(lines):
            record = {"text": "the cat sat", "label": i % 2, **{f"k{i}_{j}": 0 for j in range(keys_per_line)}}
            f.write(json.dumps(record) + "\n")
    return path


def png_zip(path: Path, images: int = 14, side: int = 7_000) -> Path:
    """``images`` solid-colour side×side PNGs (each under the per-image pixel cap) in two classes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG", optimize=True)
    png = buf.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", png)
    return path
