"""What an ONNX graph's tensors would take in memory, from ONNX shape inference alone (nothing runs).

A 220-byte graph can ask for gigabytes (``Tile``, ``Expand``, ``ConstantOfShape``, ``Range``,
``Resize`` with constant sizes): the loader estimates before onnxruntime builds a session (which
folds constants, i.e. would allocate them) and refuses a graph whose estimate is past the memory
limit. The batch dim is bound to 1 and then 2, which tells a fixed cost (constants) from a per-sample
one; token graphs get their sequence dims bound to the default length. Data propagation is off on
purpose: ONNX's own ``Range`` propagation materialises the range.

The estimate is the largest tensor the graph makes, twice (a node's input and output live
together); onnxruntime reuses buffers, so the sum of all tensors would overstate it. Shapes that
inference cannot tell (computed at run time) count as unknown, and the task's memory cap still
stops them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from ..errors import TooCostlyError
from ..spec.sizes import describe_bytes

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class ActivationCost:
    """Bytes the graph's tensors take at batch ``b``: about ``fixed + per_sample * b``."""

    fixed: int
    per_sample: int
    largest: str
    """The name of the largest tensor at batch 1 (for the error message)."""

    def at(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


def _bound(model: ModelProto, batch: int, seq_len: int) -> ModelProto:
    """A copy without its float weights' bytes, whose graph inputs have the batch (and sequence) dims fixed."""
    bound = ModelProto()
    bound.CopyFrom(model)
    for tensor in bound.graph.initializer:  # weights' values never decide a shape; small int tensors may
        if tensor.data_type in _FLOATS and len(tensor.raw_data) > 4096:
            tensor.ClearField("raw_data")
    initializers = {t.name for t in bound.graph.initializer}
    for arg in bound.graph.input:
        if arg.name in initializers or not arg.type.HasField("tensor_type"):
            continue
        for i, dim in enumerate(arg.type.tensor_type.shape.dim):
            if dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = batch if i == 0 else seq_len
    return bound


def _largest(model: ModelProto) -> tuple[int, str]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return 0, ""
    best, name = 0, ""
    graph = inferred.graph
    for value in [*graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if any(d < 0 for d in dims):
            continue
        size = math.prod(dims) * _itemsize(tensor.elem_type)
        if size > best:
            best, name = size, value.name
    return best, name


def activation_cost(model: ModelProto, seq_len: int = 128) -> ActivationCost:
    """The graph's tensor memory as a fixed and a per-sample part (see the module doc)."""
    fixed_batch = _fixed_batch(model)
    if fixed_batch:  # exported with a static batch: every call runs that many samples
        one, name = _largest(_bound(model, fixed_batch, seq_len))
        return ActivationCost(fixed=2 * one, per_sample=0, largest=name)
    one, name = _largest(_bound(model, 1, seq_len))
    two, _ = _largest(_bound(model, 2, seq_len))
    per_sample = max(0, two - one)
    return ActivationCost(fixed=2 * max(0, one - per_sample), per_sample=2 * per_sample, largest=name)


def _fixed_batch(model: ModelProto) -> int:
    initializers = {t.name for t in model.graph.initializer}
    for arg in model.graph.input:
        if arg.name not in initializers and arg.type.HasField("tensor_type"):
            dims = arg.type.tensor_type.shape.dim
            return dims[0].dim_value if dims and dims[0].dim_value > 0 else 0
    return 0


def check_activation_cost(model: ModelProto, memory_bytes: int, name: str, seq_len: int = 128) -> ActivationCost:
    """Refuse (``resource_limit``) a graph that one sample would take past half of ``memory_bytes``."""
    cost = activation_cost(model, seq_len)
    need = cost.at(1)
    if need > memory_bytes // 2:
        raise TooCostlyError(
            f"{name}: running one sample makes tensor {cost.largest!r} and needs about {describe_bytes(need)}, "
            f"past half of this task's memory limit of {describe_bytes(memory_bytes)} (shapes from ONNX shape "
            f"inference; an op that expands its input — Tile, Expand, ConstantOfShape, Range, Resize — with "
            f"a huge constant size?)")
    return cost

