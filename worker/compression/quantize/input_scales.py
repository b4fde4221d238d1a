"""Layers that read raw features of very different scales stay in float.

int8 quantizes a layer's input with one scale for the whole tensor. A model on raw tabular features
(breast cancer: 0.001 to 4,000) then rounds every small feature to 0: its static and its dynamic int8
both answered the commonest class for every row (0.626 against 0.965 in fp32), and a raw-scale
regression's int8 MSE was 1,500× its fp32's. So the training sample is looked at: when a feature's
range of values (1st to 99th percentile) is under 1/``SPREAD`` of the largest magnitude, the
layers that read those inputs directly are kept in float (their input is never quantized), and the
layers after them, which see activations of one scale, are quantized as usual. Features of one
scale (pixels, standardised tables) are untouched: a raw digits student (0 to 16) quantizes whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

SPREAD = 128.0
"""A feature whose range is under 1/SPREAD of the tensor's largest magnitude spans at most two of
int8's 256 levels (255 steps over -max..max: the range of a symmetric or zero-including scale)."""


def raw_scale_nodes(model: onnx.ModelProto, candidates: list[tuple[str, str]],
                    sample: Mapping[str, np.ndarray] | None) -> dict[str, float]:
    """Of ``candidates`` ((name, op_type) of weight nodes), the Gemm / MatMul nodes that read a graph
    input (or its flattening) whose features in ``sample`` span more than ``SPREAD`` (``magnitude_span``);
    each with that span."""
    if not sample:
        return {}
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    spans = {name: span for name, x in sample.items() if (span := magnitude_span(np.asarray(x))) > SPREAD}
    if not spans:
        return {}
    producer = {o: n for n in graph.node for o in n.output}
    named = {name for name, op in candidates if op in ("Gemm", "MatMul")}
    out: dict[str, float] = {}
    for node in graph.node:
        if node.name not in named or len(node.input) < 2 or node.input[1] not in weights:
            continue
        source = node.input[0]
        while source in producer and producer[source].op_type in ("Flatten", "Reshape", "Cast"):
            source = producer[source].input[0]
        if source in spans:
            out[node.name] = spans[source]
    return out


def magnitude_span(x: np.ndarray) -> float:
    """The largest magnitude among the features over the smallest feature's range of values (1st to
    99th percentile), among features that vary: how many times finer than one int8 step of the whole
    tensor the finest feature is. 1 for integer ids, single features and empty samples."""
    if x.ndim < 2 or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        return 1.0
    flat = x.reshape(len(x), -1).astype(np.float64)
    low, high = np.quantile(flat, [0.01, 0.99], axis=0)
    ranges = high - low
    live = ranges[ranges > 0]
    if len(live) < 2:
        return 1.0
    return float(max(np.abs(low).max(), np.abs(high).max()) / live.min())
