"""ONNX graph plumbing shared by the quantizers: loading and saving (external data for large graphs),
onnxruntime's pre-processing, the weight-bearing nodes, float graph outputs, quiet quantizer runs."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputError, ModelFileError

LARGE_MODEL_BYTES = 1_500_000_000


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's quantizers log hundreds of harmless warnings on the root logger (int64 shape
    tensors they skip), numpy divide warnings and calibrator prints; keep them out of the worker's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelFileError(f"{path.name} is not a readable ONNX model: {exc}") from exc


def save_model(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > LARGE_MODEL_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large,
                    location=path.name + ".data" if large else None)


def np_dtype(value_info: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def graph_feeds(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs from ``inputs`` in the graph's dtypes; extra keys are ignored. A graph of one
    input takes the one array given whatever either is called (``x`` for ``image``)."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(graph_inputs) == 1 and len(inputs) == 1 and graph_inputs[0].name not in inputs:
        inputs = {graph_inputs[0].name: next(iter(inputs.values()))}
    missing = [i.name for i in graph_inputs if i.name not in inputs]
    if missing:
        raise InputError(f"calibration data lacks model inputs {missing}; it has {sorted(inputs)}")
    return {i.name: np.asarray(inputs[i.name]).astype(np_dtype(i), copy=False) for i in graph_inputs}


def prepare_graph(src: Path, dst: Path, *, gemm_to_matmul: bool) -> onnx.ModelProto:
    """quant_pre_process (ORT basic graph optimisation: constant folding, Conv+BN fusion; then
    ONNX shape inference), and for dynamic / weight-only methods Gemm -> MatMul + Add so that
    linear layers on 2-D inputs are quantized under their own node names.

    Symbolic shape inference is skipped: it fails on transformers' BERT exports and then writes
    a temp file into the working directory; ONNX shape inference suffices for our exports.
    """
    # onnxruntime.quantization is loaded only when a graph is quantized (as in ort_methods)
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = inlined(src, dst.parent)
    with quiet():
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as exc:  # onnx / onnxruntime raise many types for a bad graph
            raise ModelFileError(f"cannot prepare {src.name} for quantization: {exc}") from exc
    model = onnx.load(str(dst))
    if gemm_to_matmul and any(n.op_type == "Gemm" for n in model.graph.node):
        wrapped = ONNXModel(model)
        wrapped.replace_gemm_with_matmul()
        model = onnx.shape_inference.infer_shapes(wrapped.model)
        save_model(model, dst)
    return model


def inlined(src: Path, work: Path) -> Path:
    """``src`` with its external weights (torch's default exporter writes ``model.onnx.data`` beside the
    graph) read into one file in ``work`` when they fit in one: quant_pre_process copies the graph
    alone into a temp folder and then cannot find them ("should be stored in /tmp/…/model.onnx.data")."""
    try:
        head = onnx.load(str(src), load_external_data=False)
    except Exception:  # not a readable graph: the caller's own load says so, by name
        return src
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in head.graph.initializer)
    if not external or sum(f.stat().st_size for f in src.parent.iterdir() if f.is_file()) > LARGE_MODEL_BYTES:
        return src
    out = work / f"inlined-{src.name}"
    onnx.save_model(onnx.load(str(src)), str(out))
    return out


def graph_batch(path: Path) -> int | None:
    """The first input's batch size when the graph fixes it (a number, not a name), else None."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    first = next((i for i in graph.input if i.name not in inits), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def weight_nodes(model: onnx.ModelProto, op_types: set[str]) -> list[tuple[str, str]]:
    """(name, op_type) of nodes of ``op_types`` that read a float initializer (their weights)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = {t.name for t in model.graph.initializer if t.data_type in floats}
    out = []
    for node in model.graph.node:
        if node.op_type in op_types and node.name and any(i in weights for i in node.input):
            if node.op_type == "Gather" and node.input[0] not in weights:
                continue  # Gather over a computed tensor (shapes), not an embedding table
            out.append((node.name, node.op_type))
    return out


def float_graph_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the QuantizeLinear -> DequantizeLinear pair a QDQ graph puts on each graph output, so
    logits, regression values and embeddings keep float precision (onnxruntime then runs the last
    Gemm / MatMul with a float output); it also ran the digits MLP slightly faster."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    boundary = {v.name for v in (*graph.input, *graph.output)} | {t.name for t in graph.initializer}
    for output in graph.output:
        dq = producer.get(output.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(readers.get(q.output[0], [])) != 1:
            continue
        source = q.input[0]
        if source in boundary or source not in producer:
            continue
        for node in readers.get(source, []):
            node.input[:] = [output.name if i == source else i for i in node.input]
        src_node = producer[source]
        src_node.output[:] = [output.name if o == source else o for o in src_node.output]
        graph.node.remove(q)
        graph.node.remove(dq)
        used = {i for node in graph.node for i in node.input}
        for init in [t for t in graph.initializer if t.name in {*q.input[1:], *dq.input[1:]} - used]:
            graph.initializer.remove(init)  # the pair's scale and zero point
    return model


def copy_model(src: Path, dst: Path) -> None:
    model = onnx.load(str(src), load_external_data=False)
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        save_model(load_model(src), dst)
    else:
        shutil.copyfile(src, dst)
