"""An ONNX graph as a black-box teacher, run through onnxruntime on CPU.

Checks run before anything executes: the protobuf parses, external data stays inside the
model's folder and is as long as its tensors need, every op is a known ONNX op (or an
onnxruntime contrib op), the graph passes the ONNX checker, and float weights are finite.
The input kind (vector / signal / image / tokens) and the output size are read from the
graph and confirmed by running one zero batch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ..errors import (
    DatasetError,
    ModelFileError,
    NonFiniteWeightsError,
    TruncatedFileError,
    UnsafeFileError,
    UnsupportedOpError,
)
from ..measure.export import fixed_batch, run_rows
from ..students.zoo import TASKS
from ..types import TOKEN_KEYS, InputKind, Task, Teacher
from .onnx_cost import activation_cost, check_activation_cost
from .onnx_inputs import ids_layout, wrap_single_input
from .teacher_meta import class_names

DEFAULT_SEQ_LEN = 128
ONNX_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview.training")
ORT_DOMAINS = ("com.microsoft",)
"""Custom domains onnxruntime registers itself; it decides about their ops."""
NP_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}
FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")
INT_TYPES = ("tensor(int64)", "tensor(int32)")
RANK_KINDS: dict[int, InputKind] = {2: "vector", 3: "signal", 4: "image"}
FLOAT_TENSORS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
              ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.EPFail)
_NO_KERNEL = re.compile(r"implementation for (\S+?)\((\d+)\) node with name '([^']*)'")


# --- graph walking ----------------------------------------------------------------------

def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """The graph and its subgraphs (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _tensors(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every stored tensor with a name to report: initializers and Constant-style attributes."""
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            yield init.name, init
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name or sparse.values.name, sparse.indices
        for node in graph.node:
            label = f"constant of node {node.name or node.output[0]!r}"
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t.name or label, attr.t
                elif attr.type == AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t.name or label, t


# --- checks -----------------------------------------------------------------------------

def _read_proto(path: Path) -> ModelProto:
    if path.stat().st_size == 0:
        raise TruncatedFileError(f"{path.name} is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise TruncatedFileError(
            f"{path.name} does not parse as an ONNX model (truncated or corrupt): {exc}") from exc
    if not model.graph.node:
        raise TruncatedFileError(f"{path.name} holds no graph (truncated or not an ONNX model)")
    return model


def _check_external_data(model: ModelProto, folder: Path) -> set[Path]:
    """Every external-data location must be a file inside ``folder`` long enough for its tensor."""
    root = folder.resolve()
    files: set[Path] = set()
    for name, tensor in _tensors(model):
        if not uses_external_data(tensor):
            continue
        try:
            info = ExternalDataInfo(tensor)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"tensor {name!r} has malformed external data fields: {exc}") from exc
        if not info.location:
            raise ModelFileError(f"tensor {name!r} uses external data but names no location")
        loc = PurePosixPath(str(info.location).replace("\\", "/"))
        if loc.is_absolute() or ".." in loc.parts or ":" in str(loc):
            raise UnsafeFileError(
                f"tensor {name!r}: external data location {info.location!r} leaves the model folder")
        target = (root / loc).resolve()
        if not target.is_relative_to(root):
            raise UnsafeFileError(
                f"tensor {name!r}: external data {info.location!r} resolves outside the model folder")
        if not target.is_file():
            raise ModelFileError(
                f"tensor {name!r}: external data file {info.location!r} is missing: upload a zip of the .onnx "
                f"and {info.location} together (format onnx_zip; `kdq compress --teacher model.onnx` sends both)")
        offset = int(info.offset or 0)
        available = target.stat().st_size - offset
        length = available if info.length is None else int(info.length)
        if offset < 0 or length < 0:
            raise ModelFileError(f"tensor {name!r}: negative external data offset or length")
        needed = math.prod(tensor.dims) * itemsize
        if length > available or length < needed:
            raise TruncatedFileError(
                f"tensor {name!r}: external data {info.location!r} holds {max(available, 0)} bytes from offset "
                f"{offset}, the tensor needs {needed} (truncated file?)")
        files.add(target)
    return files


def _check_ops(model: ModelProto) -> None:
    """Reject ops no runtime here implements, naming them, before onnxruntime sees the graph."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    local = {(f.domain, f.name) for f in model.functions}
    for graph in _graphs(model.graph):
        for node in graph.node:
            domain = "" if node.domain == "ai.onnx" else node.domain
            if (node.domain, node.op_type) in local or domain in ORT_DOMAINS:
                continue
            where = f"op {node.op_type!r} (node {node.name!r}, domain {domain or 'ai.onnx'!r})"
            if domain not in ONNX_DOMAINS:
                raise UnsupportedOpError(f"{where} is from a custom domain onnxruntime does not know")
            version = opsets.get(domain)
            if version is None:
                raise UnsupportedOpError(f"{where}: the model imports no opset for its domain")
            if not onnx.defs.has(node.op_type, version, domain):
                raise UnsupportedOpError(f"{where} is not an ONNX operator at opset {version}")


def _check_finite(model: ModelProto) -> None:
    for name, tensor in _tensors(model):
        if tensor.data_type not in FLOAT_TENSORS:
            continue
        arr = numpy_helper.to_array(tensor)
        if arr.dtype.kind != "f":  # bfloat16 (ml_dtypes): widen, exactly
            arr = arr.astype(np.float32)
        finite = np.isfinite(arr)
        if not finite.all():
            nan = int(np.isnan(arr).sum())
            inf = arr.size - int(finite.sum()) - nan
            raise NonFiniteWeightsError(f"initializer {name!r} has {nan} NaN and {inf} infinite value(s)")


def _check_model(model: ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(model if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF else str(path))
    except (onnx.checker.ValidationError, onnx.defs.SchemaError) as exc:
        raise ModelFileError(f"{path.name} is not a valid ONNX model: {exc}") from exc


def _session(path: Path, threads: int, graph: bytes | None = None) -> ort.InferenceSession:
    """A CPU session of ``path``, or of ``graph`` (the serialised graph to run instead, `onnx_inputs`)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(graph if graph is not None else str(path), opts, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        msg = str(exc)
        if m := _NO_KERNEL.search(msg):
            node = f", node {m[3]!r}" if m[3] else ""
            raise UnsupportedOpError(
                f"onnxruntime has no CPU kernel for op {m[1]!r} (opset {m[2]}{node}) with these input types"
            ) from exc
        if isinstance(exc, ort_state.NotImplemented) or "not a registered function/op" in msg:
            raise UnsupportedOpError(f"onnxruntime cannot run an op of this graph: {msg}") from exc
        raise ModelFileError(f"onnxruntime rejected {path.name}: {msg}") from exc


# --- running ----------------------------------------------------------------------------

class _Runner:
    """Maps our input dict onto the graph's inputs, runs it, returns (N, D) float32."""

    def __init__(self, session: ort.InferenceSession, input_kind: InputKind, pooled: bool) -> None:
        self.session = session
        self.args = session.get_inputs()
        self.output = session.get_outputs()[0].name
        self.tokens = input_kind == "tokens"
        self.pooled = pooled
        self.wrapped: bytes | None = None
        """The graph it runs when not the file's (a click model's inputs as one ``x``, `onnx_inputs`)."""

    def _feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for arg in self.args:
            if self.tokens:
                value = inputs.get(arg.name)
                if value is None and arg.name in ("attention_mask", "token_type_ids"):
                    ids = inputs["input_ids"]
                    value = torch.ones_like(ids) if arg.name == "attention_mask" else torch.zeros_like(ids)
            else:
                value = inputs.get("x", inputs.get(arg.name))
                if value is None and len(inputs) == 1:
                    value = next(iter(inputs.values()))
            if value is None:
                raise DatasetError(f"the ONNX teacher needs input {arg.name!r}; the data has {sorted(inputs)}")
            feeds[arg.name] = value.detach().cpu().numpy().astype(NP_TYPES[arg.type], copy=False)
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.session.run([self.output], feeds)[0]
        except ORT_ERRORS as exc:
            raise DatasetError(f"the ONNX teacher rejected the batch: {exc}") from exc

    def _run_batched(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Graphs exported with a fixed batch size run in chunks of it, the last one zero-padded."""
        try:
            return run_rows(self.session, feeds, self.output)
        except ORT_ERRORS as exc:
            raise DatasetError(f"the ONNX teacher rejected the batch: {exc}") from exc

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(self._run_batched(self._feeds(inputs)))).float()
        if self.pooled:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask", torch.ones_like(ids)).to(out.dtype)[..., None]
            out = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return out[:, None] if out.ndim == 1 else out


def _input_kind(args: list[Any]) -> tuple[InputKind, tuple[int, ...]]:
    described = ", ".join(f"{a.name} {a.type} {a.shape}" for a in args)
    names = {a.name for a in args}
    if "input_ids" in names:
        if not names <= set(TOKEN_KEYS) or any(a.type not in INT_TYPES or len(a.shape) != 2 for a in args):
            raise ModelFileError(
                f"token inputs must be int (batch, seq) tensors named {', '.join(TOKEN_KEYS)}; "
                f"the graph has {described}")
        seq = next(a for a in args if a.name == "input_ids").shape[1]
        return "tokens", (seq if isinstance(seq, int) and seq > 0 else DEFAULT_SEQ_LEN,)
    if len(args) != 1 or args[0].type not in FLOAT_TYPES:
        raise ModelFileError(
            f"expected one float input (or token inputs named {', '.join(TOKEN_KEYS)}, or a click model's int "
            f"(batch,) / (batch, 1) id inputs beside at most one float (batch, F) input, opset ≥ 11); "
            f"the graph has {described}")
    shape = args[0].shape
    kind = RANK_KINDS.get(len(shape))
    if kind is None:
        raise ModelFileError(
            f"input {args[0].name!r} has rank {len(shape)}; expected 2 (vector), 3 (signal) or 4 (image)")
    sample = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in sample):
        raise ModelFileError(
            f"input {args[0].name!r} has shape {shape}; export it with static per-sample dims (only the batch "
            "dim may be dynamic)")
    return kind, tuple(sample)


def _probe(runner: _Runner, kind: InputKind, shape: tuple[int, ...]) -> np.ndarray:
    """Run one zero batch: proves the graph executes and gives the real output shape."""
    n = fixed_batch(runner.session) or 1
    if kind == "tokens":
        ids = torch.zeros((n, *shape), dtype=torch.long)
        feeds = runner._feeds({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    else:
        feeds = runner._feeds({"x": torch.zeros((n, *shape))})
    try:
        return runner._run(feeds)
    except DatasetError as exc:
        raise ModelFileError(f"the graph fails on a zero batch of its declared input shape: {exc}") from exc


def _task(task: str | None, meta: dict[str, str], output_name: str, pooled: bool,
          output_dim: int) -> tuple[Task, str]:
    """The task and where it came from: the argument, metadata (``kdq_task`` or ``task``), or
    inferred from the output (one value: regression; an embedding name or pooled tokens: embedding)."""
    if task is not None:
        chosen, source = task, "argument"
    elif "kdq_task" in meta or "task" in meta:
        chosen, source = meta.get("kdq_task") or meta["task"], "metadata"
    elif pooled or "embed" in output_name.lower():
        chosen, source = "embedding", "inferred"
    else:
        chosen, source = ("regression" if output_dim == 1 else "classification"), "inferred"
    if chosen not in TASKS:
        raise ModelFileError(f"unknown task {chosen!r} ({source}); known: {', '.join(TASKS)}")
    return chosen, source  # type: ignore[return-value]


def load_onnx_teacher(path: str | os.PathLike[str], *, task: str | None = None, threads: int = 1,
                      memory_bytes: int | None = None) -> Teacher:
    """Check and load an ONNX file as a black-box teacher (see the module doc). With ``memory_bytes``
    (the task's memory limit) a graph whose tensors would not fit is refused before it runs."""
    path = Path(path)
    model = _read_proto(path)
    external = _check_external_data(model, path.parent)
    cost = (check_activation_cost(model, memory_bytes, path.name) if memory_bytes
            else activation_cost(model))  # fmt: skip
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{path.name}: cannot read external data: {exc}") from exc
    _check_ops(model)
    _check_model(model, path)
    _check_finite(model)
    num_parameters = sum(math.prod(t.dims) for g in _graphs(model.graph) for t in g.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    producer = f"{model.producer_name} {model.producer_version}".strip()
    convolutional = any(n.op_type in ("Conv", "ConvTranspose") for g in _graphs(model.graph) for n in g.node)
    layout = ids_layout(model)  # a click model's id and dense inputs: run as one float x
    wrapped = wrap_single_input(model, layout).SerializeToString() if layout else None
    del model  # onnxruntime holds its own copy

    session = _session(path, threads, wrapped)
    args, out_arg = session.get_inputs(), session.get_outputs()[0]
    input_kind, input_shape = _input_kind(args)
    if out_arg.type not in FLOAT_TYPES:
        raise ModelFileError(f"output {out_arg.name!r} is {out_arg.type}; a teacher must output float logits, "
                             "values or embeddings")
    runner = _Runner(session, input_kind, pooled=False)
    runner.wrapped = wrapped
    out = _probe(runner, input_kind, input_shape)
    if out.ndim == 3 and input_kind == "tokens":
        runner.pooled = True
    elif out.ndim not in (1, 2):
        raise ModelFileError(
            f"output {out_arg.name!r} has shape {list(out.shape)} on a zero batch; expected (N, D)"
            + (" or (N, T, D)" if input_kind == "tokens" else ""))
    output_dim = 1 if out.ndim == 1 else int(out.shape[-1])
    config = {
        "format": "onnx",
        "file": path.name,
        "inputs": [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in args],
        "output": {"name": out_arg.name, "type": out_arg.type, "shape": list(out_arg.shape)},
        "pooled": runner.pooled,
        "opsets": opsets,
        "producer": producer,
        "metadata": meta,
        "activation_bytes": {"fixed": cost.fixed, "per_sample": cost.per_sample},
        "convolutional": convolutional,
    }
    if layout:
        config["ids_layout"] = layout
    chosen, source = _task(task, meta, out_arg.name, runner.pooled, output_dim)
    names = meta.get("classes") or meta.get("kdq_classes") or meta.get("id2label")
    return Teacher(
        kind="onnx",
        task=chosen,
        task_source="inferred" if source == "inferred" else "declared",
        classes=class_names(names, output_dim, "ONNX metadata classes") if chosen == "classification" else None,
        input_names=tuple(a.name for a in args),
        input_kind=input_kind,
        input_shape=input_shape,
        output_dim=output_dim,
        config=config,
        source_dir=path.parent,
        run_onnx=runner,
        num_parameters=num_parameters,
        size_bytes=path.stat().st_size + sum(f.stat().st_size for f in external),
    )
